"""Pictures for people: titled grids, the error map's scale, superpixels and
parsing classes (uint8 arrays; `files.save_png` writes them)."""
import math

import numpy as np
from PIL import Image
from PIL import ImageDraw
from PIL import ImageFont

# Tiles are scaled up (nearest, whole multiples) to at least this side so
# that a 32² or 64² generator's outputs can be looked at.
MIN_TILE = 256
_TEXT = (0, 0, 0)
# Tiles are framed in gray so that a white tile (an all in-domain mask)
# still shows where it ends.
_FRAME = 128


def grid(tiles, pad=2, value=255):
  """Tiles (each (H, W, 3) uint8, or (H, W) gray) side by side, `pad` apart."""
  rows = []
  for t in tiles:
    t = np.asarray(t)
    if t.ndim == 2:
      t = np.repeat(t[..., None], 3, axis=-1)
    elif t.shape[-1] == 1:
      t = np.repeat(t, 3, axis=-1)
    rows.append(t)
  h = max(t.shape[0] for t in rows)
  out = []
  for i, t in enumerate(rows):
    if t.shape[0] < h:
      t = np.pad(t, ((0, h - t.shape[0]), (0, 0), (0, 0)),
                 constant_values=value)
    if i:
      out.append(np.full((h, pad, 3), value, np.uint8))
    out.append(t.astype(np.uint8))
  return np.concatenate(out, axis=1)


def _font():
  return ImageFont.load_default()


def _rgb(tile):
  t = np.asarray(tile)
  if t.ndim == 2:
    t = t[..., None]
  if t.shape[-1] == 1:
    t = np.repeat(t, 3, axis=-1)
  return t.astype(np.uint8)


def upscale(image, min_side=MIN_TILE):
  """Nearest-neighbour upscaling by the whole factor that brings the shorter
  side to at least `min_side` (pixels stay sharp squares); larger images are
  returned as they are."""
  image = np.asarray(image)
  k = max(1, math.ceil(min_side / max(1, min(image.shape[:2]))))
  if k == 1:
    return image
  return np.repeat(np.repeat(image, k, axis=0), k, axis=1)


def _fit(text, width, font):
  """`text`, cut with '…' to fit `width` pixels."""
  if font.getlength(text) <= width:
    return text
  while text and font.getlength(text + "…") > width:
    text = text[:-1]
  return text + "…"


def title_strip(titles, widths, pad=2, value=255):
  """A white strip with each title centred over its column and a gray line
  under it (uint8 RGB)."""
  font = _font()
  left, top, right, bottom = font.getbbox("Ag(")
  height = bottom - top + 9
  total = sum(widths) + pad * (len(widths) - 1)
  strip = Image.new("RGB", (total, height), (value,) * 3)
  draw = ImageDraw.Draw(strip)
  x = 0
  for title, w in zip(titles, widths):
    text = _fit(str(title), w - 4, font)
    draw.text((x + (w - font.getlength(text)) / 2, 4 - top), text,
              fill=_TEXT, font=font)
    x += w + pad
  draw.line((0, height - 1, total - 1, height - 1), fill=(_FRAME,) * 3)
  return np.asarray(strip)


def titled_grid(tiles, titles, pad=2, min_side=MIN_TILE):
  """Tiles side by side (scaled up to `min_side`) `pad` gray pixels apart,
  a title above each."""
  if len(tiles) != len(titles):
    raise ValueError(f"{len(tiles)} tiles but {len(titles)} titles")
  tiles = [upscale(_rgb(t), min_side) for t in tiles]
  body = grid(tiles, pad=pad, value=_FRAME)
  strip = title_strip(titles, [t.shape[1] for t in tiles], pad)
  return np.concatenate([strip, body], axis=0)


def grid_titles(edit_labels, edit_names=()):
  """Column titles of grid.png: input, inversion, mask and every edit's
  name and strength ('smile_-3' → 'smile -3')."""
  titles = ["input", "inversion", "mask (white = in-domain)"]
  for label in edit_labels:
    name = next((n for n in sorted(edit_names, key=len, reverse=True)
                 if label.startswith(n + "_")), None)
    titles.append(label if name is None
                  else f"{name} {label[len(name) + 1:]}")
  return titles


def image_grid(input_u8, inversion_u8, mask_u8, edit_tiles, edit_names):
  """grid.png of one image: input, inversion, mask (None: a method without
  one) and every edit, the columns titled, tiles scaled up for small
  generators."""
  titles = grid_titles(list(edit_tiles), edit_names)
  heads = [input_u8, inversion_u8, mask_u8]
  if mask_u8 is None:
    heads, titles = heads[:2], titles[:2] + titles[3:]
  return titled_grid(heads + list(edit_tiles.values()), titles)


def error_figure(error_map, label="LPIPS", min_side=MIN_TILE):
  """The error map (`error_picture`, scaled up) with a colour bar on the
  right that gives its scale: black = 0, white = the map's maximum."""
  e = np.asarray(error_map, np.float32)
  top = float(np.max(e)) if e.size and np.isfinite(np.max(e)) else 0.0
  picture = upscale(error_picture(e), min_side)
  h = picture.shape[0]
  font = _font()
  texts = [f"{top:.3g}", "0", label]
  text_w = int(max(font.getlength(t) for t in texts)) + 6
  bar_w = 14
  canvas = Image.new("RGB", (picture.shape[1] + 8 + bar_w + text_w, h),
                     (255, 255, 255))
  canvas.paste(Image.fromarray(_rgb(picture)), (0, 0))
  ramp = np.linspace(255, 0, h)[:, None].repeat(bar_w, axis=1)
  x0 = picture.shape[1] + 8
  canvas.paste(Image.fromarray(np.floor(ramp + 0.5).astype(np.uint8)),
               (x0, 0))
  draw = ImageDraw.Draw(canvas)
  draw.rectangle((x0, 0, x0 + bar_w - 1, h - 1), outline=(128, 128, 128))
  _, t, _, b = font.getbbox("0")
  draw.text((x0 + bar_w + 3, -t), texts[0], fill=_TEXT, font=font)
  draw.text((x0 + bar_w + 3, h - b - 1), texts[1], fill=_TEXT, font=font)
  draw.text((x0 + bar_w + 3, h // 2 - (b - t) // 2 - t),
            _fit(label, text_w, font), fill=_TEXT, font=font)
  return np.asarray(canvas)


# --------------------------------------------------------------------------
# Pictures of intermediate results


def superpixel_picture(image_uint8, labels, boundaries=None,
                       color=(255, 255, 0), min_side=256):
  """Every superpixel filled with its mean colour; on images of at least
  `min_side` pixels also its boundaries in `color` (on small images the
  boundaries would cover most pixels)."""
  image = np.asarray(image_uint8, np.float64)
  labels = np.asarray(labels)
  flat = labels.ravel()
  count = np.maximum(np.bincount(flat), 1)
  means = np.stack([np.bincount(flat, weights=image[..., c].ravel()) / count
                    for c in range(image.shape[-1])], axis=-1)
  out = np.clip(np.floor(means[labels] + 0.5), 0, 255).astype(np.uint8)
  if boundaries is not None and min(labels.shape) >= min_side:
    out[np.asarray(boundaries, bool)] = color
  return out


# One colour per CelebAMask-HQ class (background black), fixed so pictures
# of different runs compare.
PARSING_PALETTE = np.array([
    [0, 0, 0], [204, 0, 0], [76, 153, 0], [204, 204, 0], [51, 51, 255],
    [204, 0, 204], [0, 255, 255], [255, 204, 204], [102, 51, 0],
    [255, 0, 0], [102, 204, 0], [255, 255, 0], [0, 0, 153], [0, 0, 204],
    [255, 51, 153], [0, 204, 204], [0, 51, 0], [255, 153, 51],
    [0, 204, 0]], np.uint8)


def parsing_picture(probs):
  """(H, W, C) class probabilities → colour-coded argmax (H, W, 3) uint8."""
  labels = np.argmax(np.asarray(probs), axis=-1)
  return PARSING_PALETTE[labels % len(PARSING_PALETTE)]


def error_picture(error_map):
  """(H, W[, 1]) LPIPS error map → gray uint8 scaled by the image's maximum."""
  e = np.asarray(error_map, np.float32)
  if e.ndim == 3:
    e = e[..., 0]
  top = float(e.max()) if e.size and np.isfinite(e.max()) else 0.0
  if top > 0:
    e = e / top
  return np.clip(np.floor(e * 255.0 + 0.5), 0, 255).astype(np.uint8)

