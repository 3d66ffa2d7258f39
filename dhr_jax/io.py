"""Images into a run: input files and their conversions.

Inputs are a folder (its png/jpg/jpeg/webp files, sorted by name) or a single
file. Every image becomes an RGB float32 array in [-1, 1] at the generator's
resolution: grayscale and palette images are converted, an alpha channel is
composited onto white, non-square images are centre-cropped to a square
(logged) and the square is resized with Lanczos. `to_uint8` is the way back
to pixels. (Outputs: `dhr_jax.files`, `dhr_jax.pictures`, `dhr_jax.workdir`.)
"""
import os

import numpy as np
from absl import logging
from PIL import Image
from PIL import ImageOps
from PIL import UnidentifiedImageError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp")


class ImageError(ValueError):
  """An input file is not a usable image; the message names file and cause."""


# Inputs upscaled by more than this factor are logged: their outputs show
# the generator's guess at detail the input never had.
MAX_UPSCALE = 2.0


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

