"""What every PyTorch → orbax converter shares: reading, key checking, CLI."""
import argparse
import os
import sys
import tempfile

import numpy as np

from dhr_jax import files
from dhr_jax.checkpoint import CheckpointError, torch_refusal


class ConversionError(ValueError):
  """The source checkpoint does not match the architecture we convert to."""


def torch_load(path):
  """Loads a `.pt` file safely (tensors and plain containers only)."""
  try:
    import torch
  except ImportError:  # pragma: no cover - depends on the install
    raise ConversionError(
        "converters need PyTorch (CPU): pip install -e '.[convert]'")
  if not os.path.isfile(path):
    raise ConversionError(f"{path}: no such file")
  try:
    return torch.load(path, map_location="cpu", weights_only=True)
  except Exception as e:  # torch raises many types for a bad file
    raise ConversionError(
        f"{path}: not a checkpoint this converter reads ({torch_refusal(e)})."
        " Pass the .pt file as released.") from None


def to_numpy(state_dict, prefix=""):
  """{name: tensor} → {name without prefix: float32/int numpy}, keys filtered by prefix."""
  out = {}
  for k, v in state_dict.items():
    if not k.startswith(prefix):
      continue
    a = v.detach().cpu().numpy() if hasattr(v, "detach") else np.asarray(v)
    out[k[len(prefix):]] = a
  return out


def read_plain_state_dict(src, released):
  """{key: numpy} of a plain state dict at `src` (IR-101, DiffCam,
  deghosting are published so); anything else is one ConversionError that
  ends with `released` (what to pass instead)."""
  ckpt = torch_load(src)
  if not isinstance(ckpt, dict) or not ckpt:
    raise ConversionError(
        f"{src}: not a state dict (got {type(ckpt).__name__}); {released}.")
  not_tensors = sorted(str(k) for k, v in ckpt.items()
                       if not hasattr(v, "detach"))
  if not_tensors:
    hint = (" It looks like a training bundle; convert it with its own "
            "converter (e.g. converters.e4e)." if "state_dict" in ckpt
            or "g_ema" in ckpt else "")
    raise ConversionError(
        f"{src}: not a plain state dict of tensors (entries "
        f"{', '.join(not_tensors[:10])} are not tensors); {released}.{hint}")
  return to_numpy(ckpt)


def conv_to_hwio(w):
  """A PyTorch conv weight (out, in, kh, kw) as Flax's HWIO, float32."""
  return np.ascontiguousarray(np.transpose(w, (2, 3, 1, 0)), np.float32)


def f32(a):
  return np.ascontiguousarray(a, np.float32)


def check_keys(path, got, expected, ignore=()):
  """Raises ConversionError naming every missing, unexpected or mis-shaped key.

  got, expected: {name: array or shape}. `ignore` names keys that may be
  present but are not converted (e.g. integer BatchNorm counters).
  """
  got_names = set(got) - set(ignore)
  exp_names = set(expected)
  problems = []
  missing = sorted(exp_names - got_names)
  extra = sorted(got_names - exp_names)
  if missing:
    problems.append(f"missing keys: {', '.join(missing)}")
  if extra:
    problems.append(f"unexpected keys: {', '.join(extra)}")
  for k in sorted(exp_names & got_names):
    want = tuple(np.shape(expected[k]) if not isinstance(expected[k], tuple)
                 else expected[k])
    have = tuple(np.shape(got[k]))
    if want != have:
      problems.append(f"shape of {k}: checkpoint has {have}, expected {want}")
  if problems:
    raise ConversionError(
        f"{path}: does not match the architecture inferred from it:\n  "
        + "\n  ".join(problems))


class _Parser(argparse.ArgumentParser):
  """argparse whose refusals are one `error:` line (exit 2), no usage dump."""

  def error(self, message):
    print(f"error: {message} (see --help)", file=sys.stderr)
    sys.exit(2)


def check_destination(dst, is_file=False):
  """Refuses a --dst that cannot be written before any conversion work.

  is_file: dst is a file (its folder must be creatable), not a folder.
  """
  try:
    path = files.check_creatable(dst, what="--dst", is_file=is_file)
  except files.WorkdirError as e:
    raise ConversionError(str(e)) from None
  # os.access reads mode bits, which let root write anywhere; /proc and
  # read-only mounts refuse only an actual write. The output is first
  # written beside --dst (DST.tmp-write), so a file is tried there.
  folder = os.path.dirname(path)
  while not os.path.exists(folder):
    folder = os.path.dirname(folder)
  try:
    fd, probe = tempfile.mkstemp(prefix=".write-probe-", dir=folder)
    os.close(fd)
    os.remove(probe)
  except OSError as e:
    raise ConversionError(
        f"--dst {path}: the folder {folder} cannot be written "
        f"({e.strerror or e}); choose another --dst") from None


def cli_main(description, convert_fn, argv=None, extra_args=None,
             dst_is_file=lambda args: False):
  """Shared `--src/--dst` command line; errors become one clear line, exit 2."""
  parser = _Parser(description=description)
  parser.add_argument("--src", required=True, help="input checkpoint")
  parser.add_argument("--dst", required=True, help="output directory")
  parser.add_argument("--overwrite", action="store_true",
                      help="replace an existing --dst")
  if extra_args:
    extra_args(parser)
  args = parser.parse_args(argv)
  try:
    check_destination(args.dst, dst_is_file(args))
    out = convert_fn(args)
  except (ConversionError, CheckpointError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  except OSError as e:  # e.g. the disk filled up or permissions changed
    print(f"error: cannot write --dst {args.dst}: "
          f"{e.strerror or e} ({e.filename or args.dst})", file=sys.stderr)
    return 2
  print(f"wrote {out}")
  return 0
