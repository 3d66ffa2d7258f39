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
import io as _io
import json
import os
import tempfile

import numpy as np
from absl import logging

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp")


class ImageError(ValueError):
  """An input file is not a usable image; the message names file and cause."""


class WorkdirError(OSError):
  """The output directory cannot be created or written."""


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
  from PIL import Image
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
  from PIL import Image, ImageOps, UnidentifiedImageError
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
  from PIL import Image
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
    rgb = rgb.resize((size, size), Image.LANCZOS)
  return np.asarray(rgb, np.float32) / 127.5 - 1.0


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
  from PIL import Image
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
RESERVED = ("metrics.csv", "summary.json", "inputs")


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
