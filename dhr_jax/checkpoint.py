"""On-disk layout shared by every converter and loader.

A converted model is a directory::

    DIR/config.json   {"kind": "stylegan2" | "e4e" | ..., "format": 1, "config": {...}}
    DIR/arrays/       orbax PyTree checkpoint of nested dicts of float32 arrays
 or DIR/arrays.npz    the same nested dicts, flattened ("a/b" keys) (local=True)

Arrays are written as numpy so they restore on any host without sharding
information; loaders turn them into jnp arrays. The .npz form is for what
one process of a multi-process run writes on its own (a run's per-image
refined states): orbax writes numpy arrays from process 0 only and
synchronises every save across all processes.
"""
import json
import os
import re
import zipfile

import jax
import jax.numpy as jnp
import numpy as np

FORMAT_VERSION = 1
_CONFIG = "config.json"
_ARRAYS = "arrays"
_NPZ = "arrays.npz"


class CheckpointError(ValueError):
  """A checkpoint directory is missing, incomplete or of the wrong kind."""


def torch_refusal(error):
  """Why `torch.load(..., weights_only=True)` refused a file, in a few words.

  PyTorch's own message advises re-running with weights_only=False, which
  would unpickle whatever objects the file names, i.e. run code from it; a
  checkpoint is never read that way here, so that advice is left out.
  """
  text = str(error)
  detail = text.split("WeightsUnpickler error:", 1)[-1]
  found = re.search(r"GLOBAL (\S+)", detail)
  if found:
    return (f"it stores the Python object {found.group(1)}, not only tensors "
            "and plain containers; such objects are never unpickled here")
  for line in detail.splitlines():
    line = line.strip()
    if line and not re.search(r"weights_only|likely succeed|trust|"
                              r"documentation of torch.load", line):
      return f"{type(error).__name__}: {line}"
  return type(error).__name__


def _checkpointer():
  # Imported lazily: orbax start-up is slow and most callers only read.
  import orbax.checkpoint as ocp
  return ocp.PyTreeCheckpointer()


def _flatten(tree, prefix=""):
  out = {}
  for key, value in tree.items():
    key = str(key)
    where = prefix + key
    if not key or "/" in key:
      raise ValueError(f"checkpoint keys must be non-empty without '/': "
                       f"{where!r}")
    if isinstance(value, dict):
      if not value:
        raise ValueError(f"local checkpoints hold no empty dicts: {where!r}")
      out.update(_flatten(value, where + "/"))
    elif isinstance(value, (list, tuple)):
      raise ValueError(f"local checkpoints hold dicts of arrays, not lists: "
                       f"{where!r}")
    else:
      out[where] = np.asarray(value)
  return out


def _write_npz(path, flat):
  """np.load's .npz, with a fixed time stamp on every member so the same
  arrays always give the same bytes (np.savez stamps the current time)."""
  with open(path, "wb") as f, zipfile.ZipFile(f, "w") as z:
    for key, a in flat.items():
      info = zipfile.ZipInfo(key + ".npy", date_time=(1980, 1, 1, 0, 0, 0))
      with z.open(info, "w", force_zip64=True) as member:
        np.lib.format.write_array(member, a, allow_pickle=False)


def _unflatten(flat):
  tree = {}
  for key, value in flat.items():
    *parents, leaf = key.split("/")
    node = tree
    for p in parents:
      node = node.setdefault(p, {})
    node[leaf] = value
  return tree


def save(directory, tree, kind, config, *, overwrite=False, local=False):
  """Writes `tree` (nested dicts/lists of arrays; dicts only with local=True)
  and `config` under `directory`.

  Refuses to replace an existing checkpoint unless `overwrite`; the write goes
  to a sibling temp directory first so a crash never leaves half a checkpoint
  where a good one was. local=True writes DIR/arrays.npz (nested dicts of
  arrays only) instead of orbax's DIR/arrays/, without any coordination
  between processes.
  """
  directory = os.path.abspath(os.fspath(directory))
  if os.path.exists(directory) and os.listdir(directory) and not overwrite:
    raise CheckpointError(
        f"{directory} already exists and is not empty; choose another --dst "
        "or remove it first (converters never overwrite silently).")
  flat = _flatten(tree) if local else None  # refused before anything is made
  tmp = directory + ".tmp-write"
  if os.path.exists(tmp):
    import shutil
    shutil.rmtree(tmp)
  os.makedirs(tmp)
  if local:
    _write_npz(os.path.join(tmp, _NPZ), flat)
  else:
    host_tree = jax.tree_util.tree_map(lambda x: np.asarray(x), tree)
    _checkpointer().save(os.path.join(tmp, _ARRAYS), host_tree)
  with open(os.path.join(tmp, _CONFIG), "w") as f:
    json.dump({"kind": kind, "format": FORMAT_VERSION, "config": config}, f,
              indent=2, sort_keys=True)
  if os.path.exists(directory):
    import shutil
    shutil.rmtree(directory)
  os.replace(tmp, directory)
  return directory


def read_config(directory):
  """Returns (kind, config) of a checkpoint directory, with a clear error."""
  directory = os.fspath(directory)
  path = os.path.join(directory, _CONFIG)
  if not os.path.isfile(path):
    raise CheckpointError(
        f"{directory} is not a converted dhr_jax checkpoint (no {_CONFIG}). "
        "Convert the PyTorch file first, e.g. "
        "`python -m converters.stylegan2 --src FILE.pt --dst DIR`.")
  try:
    with open(path) as f:
      meta = json.load(f)
  except (OSError, json.JSONDecodeError) as e:
    raise CheckpointError(f"{path} is unreadable ({e}); re-run the converter.")
  if meta.get("format") != FORMAT_VERSION:
    raise CheckpointError(
        f"{path} has format {meta.get('format')!r}, this dhr_jax reads "
        f"{FORMAT_VERSION}; re-run the converter.")
  return meta["kind"], meta["config"]


def _article(word):
  return "an" if str(word)[:1].lower() in "aeiou" else "a"


def load(directory, kind=None):
  """Returns (tree of jnp arrays, config). Checks `kind` when given."""
  got_kind, config = read_config(directory)
  if kind is not None and got_kind != kind:
    raise CheckpointError(
        f"{directory} holds {_article(got_kind)} {got_kind!r} checkpoint, "
        f"expected {_article(kind)} {kind!r} one.")
  directory = os.path.abspath(os.fspath(directory))
  arrays = os.path.join(directory, _ARRAYS)
  npz = os.path.join(directory, _NPZ)
  if os.path.isfile(npz):
    try:
      with np.load(npz, allow_pickle=False) as f:
        tree = _unflatten({k: f[k] for k in f.files})
    except (OSError, ValueError, EOFError, KeyError,
            zipfile.BadZipFile) as e:
      raise CheckpointError(f"{npz} is unreadable ({e}); write it again.")
  elif os.path.isdir(arrays):
    tree = _checkpointer().restore(arrays)
  else:
    raise CheckpointError(f"{directory} holds neither {_ARRAYS}/ nor {_NPZ}; "
                          "write it again (re-run the converter, or the run "
                          "for a refined image).")
  return jax.tree_util.tree_map(jnp.asarray, tree), config


def find(directory, kind):
  """Resolves `directory` to the checkpoint of `kind` it is or contains.

  A bundle (e.g. the e4e converter's output) holds one sub-directory per
  model, named by kind; a plain checkpoint directory is returned as is.
  """
  directory = os.fspath(directory)
  if not os.path.exists(directory):
    raise CheckpointError(
        f"{directory} does not exist. Convert a PyTorch checkpoint into it "
        "first (see README, 'Converting checkpoints').")
  if os.path.isfile(os.path.join(directory, _CONFIG)):
    return directory
  sub = os.path.join(directory, kind)
  if os.path.isfile(os.path.join(sub, _CONFIG)):
    return sub
  raise CheckpointError(
      f"{directory} holds no {kind!r} checkpoint (neither {_CONFIG} nor "
      f"{kind}/{_CONFIG}); convert a PyTorch checkpoint with the matching "
      "converter (README, 'Converting checkpoints').")
