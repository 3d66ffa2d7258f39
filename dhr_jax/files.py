"""Files out of a run: atomic writes, PNG and JSON, and writable folders.

Every output goes to a temporary file in the same directory first and is then
renamed over the destination (`os.replace`), so a run killed at any moment
leaves either the previous file or the complete new one, never half a PNG.
"""
import io as _io
import json
import os
import tempfile

import numpy as np
from PIL import Image


class WorkdirError(OSError):
  """The output directory cannot be created or written."""


def umask():
  """The process's umask (read without changing it)."""
  mask = os.umask(0)
  os.umask(mask)
  return mask


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
    os.chmod(tmp, 0o666 & ~umask())
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise
  return path


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


def write_csv(path, rows, columns):
  """Writes dict rows as CSV (floats with 6 significant digits), atomically."""
  def cell(v):
    if isinstance(v, float):
      return f"{v:.6g}"
    return str(v).replace(",", "_")
  lines = [",".join(columns)]
  lines += [",".join(cell(r.get(c, "")) for c in columns) for r in rows]
  return write_text(path, "\n".join(lines) + "\n")


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


def read_png(path):
  """A PNG the run wrote → (H, W, 3) uint8 RGB."""
  with Image.open(path) as im:
    return np.asarray(im.convert("RGB"))


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
