"""Files in and out of a run: image loading and atomic writes.

Inputs are a folder (its png/jpg/jpeg/webp files, sorted by name) or a single
file. Every image becomes an RGB float32 array in [-1, 1] at the generator's
resolution: grayscale and palette images are converted, an alpha channel is
composited onto white, non-square images are centre-cropped to a square
(logged) and the square is resized with Lanczos.

Every output goes to a temporary file in the same directory first and is then
renamed over the destination (`os.replace`), so a run killed at any moment
leaves either the previous file or the complete new one, never half a PNG.
"""
import errno
import fcntl
import html
import io as _io
import json
import math
import os
import tempfile
import urllib.parse

import numpy as np
from absl import logging
from PIL import Image
from PIL import ImageDraw
from PIL import ImageFont
from PIL import ImageOps
from PIL import UnidentifiedImageError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp")


class ImageError(ValueError):
  """An input file is not a usable image; the message names file and cause."""


class WorkdirError(OSError):
  """The output directory cannot be created or written."""


class WorkdirBusy(WorkdirError):
  """Another process holds the output directory's lock."""

  def __init__(self, directory, pid):
    self.pid = pid
    holder = f"pid {pid}" if pid else "a process that has not written its pid"
    super().__init__(f"workdir {directory} is in use by another run ({holder}"
                     "); wait for it to finish or choose another --workdir")

# Inputs upscaled by more than this factor are logged: their outputs show
# the generator's guess at detail the input never had.
MAX_UPSCALE = 2.0


# --------------------------------------------------------------------------
# Inputs


def list_images(path):
  """[(name, file path)] of the images at `path` (a folder or one file).

  A folder gives its files with an image extension (case-insensitive), sorted
  by file name; other files are ignored (and logged). Names are the file
  stems; when two files share a stem (a.png, a.jpg) both get their extension
  appended (a_png, a_jpg) so their outputs cannot collide.
  """
  path = os.fspath(path)
  if not path:
    raise ImageError("no input given: set --config.data.input=DIR_OR_FILE")
  if os.path.isfile(path):
    files = [path]
  elif os.path.isdir(path):
    entries = sorted(os.listdir(path))
    files = [os.path.join(path, f) for f in entries
             if os.path.splitext(f)[1].lower() in IMAGE_EXTENSIONS
             and os.path.isfile(os.path.join(path, f))]
    skipped = [f for f in entries
               if os.path.splitext(f)[1].lower() not in IMAGE_EXTENSIONS]
    if skipped:
      logging.info("ignoring %d file(s) without an image extension in %s: %s",
                   len(skipped), path, ", ".join(skipped[:10]))
    if not files:
      raise ImageError(
          f"{path}: no images ({'/'.join(IMAGE_EXTENSIONS)}) in this folder")
  else:
    raise ImageError(f"{path}: no such file or folder")
  stems = [os.path.splitext(os.path.basename(f))[0] for f in files]
  out = []
  for f, stem in zip(files, stems):
    name = stem
    if stems.count(stem) > 1:
      name = stem + "_" + os.path.splitext(f)[1][1:].lower()
    out.append((_safe_name(name), f))
  return out


def _safe_name(name):
  # Output folders are named after inputs; keep them plain path components.
  bad = set('/\\:*?"<>|\0')
  name = "".join("_" if c in bad else c for c in name).strip()
  return name if name not in ("", ".", "..") else "_" + name


def _to_rgb(im):
  """Any PIL mode → RGB; transparency composited onto white."""
  if im.mode in ("I;16", "I;16B", "I;16L", "I"):
    a = np.asarray(im, np.float64)
    top = 65535.0 if a.max() > 255 else 255.0
    im = Image.fromarray(np.clip(a / top * 255.0 + 0.5, 0, 255).astype(np.uint8))
  elif im.mode == "F":
    a = np.asarray(im, np.float64)
    top = 1.0 if a.max() <= 1.0 else 255.0
    im = Image.fromarray(np.clip(a / top * 255.0 + 0.5, 0, 255).astype(np.uint8))
  if im.mode == "P":
    im = im.convert("RGBA" if "transparency" in im.info else "RGB")
  if im.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
    im = im.convert("RGBA")
    background = Image.new("RGBA", im.size, (255, 255, 255, 255))
    im = Image.alpha_composite(background, im)
  return im.convert("RGB")


def _open_rgb(path):
  """One image file → an RGB PIL image, EXIF orientation applied; raises
  ImageError naming the file and the reason."""
  try:
    with Image.open(path) as im:
      im.load()  # decode now: truncated files fail here, not later
      mode = im.mode
      im = ImageOps.exif_transpose(im)
      rgb = _to_rgb(im)
  except UnidentifiedImageError:
    raise ImageError(f"{path}: not an image PIL can read "
                     "(corrupt or another format)") from None
  except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
    raise ImageError(f"{path}: unreadable image ({type(e).__name__}: "
                     f"{e})") from None
  if mode != "RGB":
    logging.info("%s: converted %s to RGB", path, mode)
  return rgb


def load_photo(path):
  """One image file at its own resolution → (H, W, 3) uint8 RGB (for face
  alignment and pasting back; conversions as in `load_image`)."""
  return np.asarray(_open_rgb(os.fspath(path)))


def load_image(path, size):
  """One image file → (size, size, 3) float32 in [-1, 1].

  Raises ImageError naming the file and the reason (unreadable, truncated,
  not an image, ...). Conversions and crops are logged, not errors.
  """
  path = os.fspath(path)
  rgb = _open_rgb(path)
  w, h = rgb.size
  if w != h:
    s = min(w, h)
    left, top = (w - s) // 2, (h - s) // 2
    rgb = rgb.crop((left, top, left + s, top + s))
    logging.warning("%s: %dx%d is not square, centre-cropped to %dx%d", path,
                    w, h, s, s)
  if rgb.size != (size, size):
    factor = size / rgb.size[0]
    if factor > MAX_UPSCALE:
      logging.warning("%s: upscaled %.3g× from %dx%d to the generator's "
                      "%dx%d; the result can hold no more detail than the "
                      "input", path, factor, rgb.size[0], rgb.size[0], size,
                      size)
    rgb = rgb.resize((size, size), Image.LANCZOS)
  return np.asarray(rgb, np.float32) / 127.5 - 1.0


def resize_target(images, size=256):
  """(B, H, W, 3) images in [-1, 1] → (B, size, size, 3), as the official
  DHR code's data set transform makes the target of its optimisation
  embedding (`images_resize`: torchvision `Resize((256, 256))` on the PIL
  image, i.e. PIL's bilinear resize of the uint8 picture, then /127.5 − 1).

  The official code resizes the input file; here the image already loaded
  at the generator's size is resized, which is the same picture when the
  input is at the generator's size (FFHQ-aligned 1024² crops).
  """
  return resize_uint8(to_uint8(images), size).astype(np.float32) / 127.5 - 1.0


def resize_uint8(images, size=256):
  """(B, H, W, 3) uint8 → (B, size, size, 3) uint8 by PIL's bilinear resize,
  what torchvision's `Resize((size, size))` does to a PIL image."""
  return np.stack([np.asarray(Image.fromarray(np.asarray(u, np.uint8)).resize(
      (size, size), Image.BILINEAR)) for u in images])


# --------------------------------------------------------------------------
# Outputs


def to_uint8(images):
  """[-1, 1] floats → uint8 (clipped, rounded half up)."""
  x = np.asarray(images, np.float32)
  return np.clip(np.floor((x + 1.0) * 127.5 + 0.5), 0, 255).astype(np.uint8)


def mask_to_uint8(mask):
  """[0, 1] mask (H, W[, 1]) → uint8 gray (H, W), 255 = in-domain."""
  m = np.asarray(mask, np.float32)
  if m.ndim == 3:
    m = m[..., 0]
  return np.clip(np.floor(m * 255.0 + 0.5), 0, 255).astype(np.uint8)


def write_bytes(path, data):
  """Writes `data` to `path` atomically (temp file in the folder, rename)."""
  path = os.fspath(path)
  directory = os.path.dirname(os.path.abspath(path))
  os.makedirs(directory, exist_ok=True)
  fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=directory)
  try:
    with os.fdopen(fd, "wb") as f:
      f.write(data)
    # mkstemp makes 0600 files; give the output the usual umask permissions.
    os.chmod(tmp, 0o666 & ~_umask())
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise
  return path


def _umask():
  mask = os.umask(0)
  os.umask(mask)
  return mask


def write_text(path, text):
  return write_bytes(path, text.encode("utf-8"))


def write_json(path, obj):
  return write_text(path, json.dumps(obj, indent=2, sort_keys=True,
                                     default=_json_default) + "\n")


def _json_default(x):
  if isinstance(x, np.generic):
    return x.item()
  if isinstance(x, np.ndarray):
    return x.tolist()
  if isinstance(x, (tuple, set)):
    return list(x)
  raise TypeError(f"not JSON serialisable: {type(x).__name__}")


def png_bytes(array):
  """uint8 (H, W), (H, W, 1) or (H, W, 3) → PNG file bytes (deterministic)."""
  a = np.asarray(array)
  if a.dtype != np.uint8:
    raise ValueError(f"png_bytes wants uint8, got {a.dtype}")
  if a.ndim == 3 and a.shape[-1] == 1:
    a = a[..., 0]
  buf = _io.BytesIO()
  Image.fromarray(a).save(buf, format="PNG")
  return buf.getvalue()


def save_png(path, array):
  """Saves a uint8 image as PNG, atomically."""
  return write_bytes(path, png_bytes(array))


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


def check_creatable(path, what="--workdir", is_file=False):
  """Raises WorkdirError unless `path` is, or can be made, a writable folder
  (with is_file: unless a file can be written at `path`).

  Creates nothing, so settings refused later leave no empty folder behind;
  `check_writable` then makes and probes it.
  """
  path = os.path.abspath(os.fspath(path))
  if is_file and os.path.isdir(path):
    raise WorkdirError(f"{what} {path} is a folder; name a file")
  if not is_file and os.path.isfile(path):
    raise WorkdirError(f"{what} {path} is a file, not a folder; choose "
                       f"another {what}")
  existing = os.path.dirname(path) if is_file else path
  while not os.path.exists(existing):
    existing = os.path.dirname(existing)
  if not os.path.isdir(existing):
    raise WorkdirError(f"{what} {path} is not writable: {existing} is a file, "
                       f"not a folder; choose another {what}")
  if not os.access(existing, os.W_OK | os.X_OK):
    raise WorkdirError(f"{what} {path} is not writable: no write permission "
                       f"in {existing}; choose another {what}")
  return path


def check_writable(directory):
  """Creates `directory` if needed and proves it writable, or raises.

  Called before any compute so a bad --workdir fails in a second, not after
  an hour of inversion.
  """
  directory = os.fspath(directory)
  if not directory:
    raise WorkdirError("no --workdir given")
  try:
    os.makedirs(directory, exist_ok=True)
    fd, probe = tempfile.mkstemp(prefix=".write-probe-", dir=directory)
    os.close(fd)
    os.remove(probe)
  except OSError as e:
    raise WorkdirError(f"workdir {directory} is not writable ({e.strerror or e});"
                       " choose another --workdir") from None
  return directory


class WorkdirLock:
  """An exclusive lock on a workdir, held while a run writes into it.

  `OUT/.lock` is locked with flock, which the kernel releases when the
  holder exits however it ends, so a lock left by a killed run is never
  stale; the file holds the holder's pid for the refusal message.
  """
  NAME = ".lock"

  def __init__(self, directory, name=NAME):
    # name: the sibling processes of a multi-process run lock `.lock.<k>`
    # beside process 0's `.lock` (see `runner._lock`).
    self.directory = os.path.abspath(os.fspath(directory))
    self.path = os.path.join(self.directory, name)
    self._fd = None

  def acquire(self):
    """Takes the lock or raises WorkdirBusy naming the holder's pid."""
    while True:
      fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666 & ~_umask())
      try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
      except OSError as e:
        os.close(fd)
        if e.errno not in (errno.EAGAIN, errno.EACCES):
          raise
        raise WorkdirBusy(self.directory, self._holder()) from None
      # A releasing holder unlinks the file: a lock on the unlinked inode
      # would not exclude the next run, so take the one at the path.
      try:
        same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
      except FileNotFoundError:
        same = False
      if same:
        break
      os.close(fd)
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    self._fd = fd
    return self

  def _holder(self):
    try:
      with open(self.path) as f:
        return int(f.read().strip() or 0)
    except (OSError, ValueError):
      return 0

  def release(self):
    if self._fd is None:
      return
    try:
      os.remove(self.path)
    except FileNotFoundError:
      pass
    os.close(self._fd)  # closing releases the flock
    self._fd = None

  def __enter__(self):
    return self.acquire()

  def __exit__(self, *exc):
    self.release()


# --------------------------------------------------------------------------
# Pictures for people: titled grids, the error map's scale, index.html

# Tiles are scaled up (nearest, whole multiples) to at least this side so
# that a 32² or 64² generator's outputs can be looked at.
MIN_TILE = 256
_TEXT = (0, 0, 0)
# Tiles are framed in gray so that a white tile (an all in-domain mask)
# still shows where it ends.
_FRAME = 128


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


def write_index(workdir, rows, columns, failed=()):
  """OUT/index.html: every finished image's grid with its metrics row.

  rows: [{'name', 'dir', metric: value, ...}] ('dir' the image's folder in
  the workdir); failed: [{'name', 'file', 'reason'}]. A static page with
  relative links (open it from disk or copy the folder anywhere); written
  atomically so a browser never shows half a page.
  """
  esc = html.escape
  cell = lambda v: f"{v:.4g}" if isinstance(v, float) else esc(str(v))
  head = "".join(f"<th>{esc(c)}</th>" for c in columns)
  parts = [
      "<!DOCTYPE html>", "<html><head><meta charset='utf-8'>",
      "<title>DHR results</title>",
      "<style>body{font-family:sans-serif;margin:1em}"
      "table{border-collapse:collapse;margin:.3em 0 1.5em}"
      "td,th{border:1px solid #ccc;padding:2px 6px;text-align:right}"
      "img{max-width:100%;image-rendering:pixelated}</style>",
      "</head><body>",
      f"<h1>DHR results: {len(rows)} image(s) done"
      + (f", {len(failed)} failed" if failed else "") + "</h1>",
      "<p>Columns of each grid: input, inversion, mask (white = in-domain, "
      "refined in the generator weights; black = out-of-domain, refined as a "
      "feature offset), then the edits. Metrics compare the inversion with "
      "the input; see metrics.csv and summary.json.</p>"]
  for r in rows:
    link = urllib.parse.quote(r["dir"])
    parts += [
        f"<h2 id='{esc(link)}'>{esc(r['name'])}</h2>",
        f"<a href='{link}/grid.png'><img src='{link}/grid.png' "
        f"alt='{esc(r['name'])}'></a>",
        f"<table><tr>{head}</tr><tr>"
        + "".join(f"<td>{cell(r.get(c, ''))}</td>" for c in columns)
        + "</tr></table>"]
  if failed:
    parts.append("<h2>Failed</h2><ul>")
    parts += [f"<li>{esc(str(f['file']))}: {esc(str(f['reason']))}</li>"
              for f in failed]
    parts.append("</ul>")
  parts.append("</body></html>")
  return write_text(os.path.join(workdir, "index.html"), "\n".join(parts)
                    + "\n")


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


# --------------------------------------------------------------------------
# Workdir layout: OUT/<name>/... with a completion marker written last

MARKER = "done.json"
# Names of run-level entries of the workdir that an image folder must not take.
RESERVED = ("metrics.csv", "summary.json", "inputs", "index.html")


def output_name(name):
  """The folder name of an image (run-level names get a suffix)."""
  return name + "_img" if name in RESERVED or name.startswith(".") else name


def read_marker(image_dir, optional=()):
  """The completion marker of an image folder, or None when it is missing,
  unreadable, or a file it lists is gone (the outputs are not complete).

  optional: prefixes of listed files that may be missing (re-editing only
  needs the refined state and the pictures the grid is made of).
  """
  path = os.path.join(image_dir, MARKER)
  try:
    with open(path) as f:
      marker = json.load(f)
  except (OSError, ValueError):
    return None
  files = marker.get("files")
  if not isinstance(files, list):
    return None
  for rel in files:
    if rel.startswith(tuple(optional)):
      continue
    if not os.path.exists(os.path.join(image_dir, rel)):
      return None
  return marker


def write_csv(path, rows, columns):
  """Writes dict rows as CSV (floats with 6 significant digits), atomically."""
  def cell(v):
    if isinstance(v, float):
      return f"{v:.6g}"
    return str(v).replace(",", "_")
  lines = [",".join(columns)]
  lines += [",".join(cell(r.get(c, "")) for c in columns) for r in rows]
  return write_text(path, "\n".join(lines) + "\n")
