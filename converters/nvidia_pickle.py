"""NVIDIA network pickles (stylegan2-ada-pytorch `.pkl`) read as plain data.

NVIDIA's training code saves `{'G', 'D', 'G_ema', 'augment_pipe',
'training_set_kwargs'}` with `pickle`. Each network is a persistent object of
`torch_utils.persistence`: the *source code* of its class travels inside the
file, and `pickle.load` would import NVIDIA's packages and execute that
source. This reader executes nothing from the file and imports nothing that
the file names. It knows a fixed list of globals and builds each one with its
own code:

- `torch_utils.persistence._reconstruct_persistent_obj(meta)` becomes a
  `PersistentModule` record (class name, init args/kwargs, parameters,
  buffers, child modules, the other attributes). `meta['module_src']` is
  dropped without being read.
- torch tensors: `torch._utils._rebuild_tensor_v2` / `_rebuild_parameter`
  over storages from `torch.storage._load_from_bytes` (bytes in the legacy
  `torch.save` format) become numpy arrays; storage types map to numpy
  dtypes, and offsets and strides are checked against the storage size.
- containers: `collections.OrderedDict` and `dnnlib.util.EasyDict` become
  plain dicts, `builtins.set`/`frozenset` sets, `_codecs.encode(s,
  'latin1')` bytes (old protocols); numpy scalars
  (`numpy.core.multiarray.scalar` with a numeric `numpy.dtype`) become plain
  Python numbers.

Any other global, and any persistent id outside a storage's bytes, is refused
with an error naming it, before anything is built from it. torch itself is
not needed.
"""
import dataclasses
import io
import os
import pickle
from typing import Any, Optional

import numpy as np

from converters.common import ConversionError

# torch's legacy serialisation (what `torch.storage._load_from_bytes` reads).
_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
_LEGACY_PROTOCOL = 1001
_LEGACY_HEADER = pickle.dumps(_LEGACY_MAGIC, protocol=2)

_STORAGE_DTYPES = {
    "FloatStorage": np.float32, "DoubleStorage": np.float64,
    "HalfStorage": np.float16, "LongStorage": np.int64,
    "IntStorage": np.int32, "ShortStorage": np.int16, "CharStorage": np.int8,
    "ByteStorage": np.uint8, "BoolStorage": np.bool_,
}

# Module attributes that are torch.nn.Module bookkeeping, not architecture.
_TORCH_INTERNALS = {"training", "_parameters", "_buffers", "_modules",
                    "_non_persistent_buffers_set", "_init_args",
                    "_init_kwargs"}


class RefusedPickle(ConversionError):
  """The pickle holds something this reader does not build."""


@dataclasses.dataclass
class PersistentModule:
  """One torch module of an NVIDIA pickle, as data.

  params / buffers: {name: numpy array or None}; modules: {name:
  PersistentModule or None}; attrs: the rest of the module's `__dict__`
  (e.g. `conv_clamp`, `architecture`, `w_dim`), with defaults filled in by
  the original constructor, unlike init_kwargs, which holds only what the
  caller passed.
  """
  class_name: str
  version: Any
  init_args: tuple
  init_kwargs: dict
  params: dict
  buffers: dict
  modules: dict
  attrs: dict


def state_dict(module, prefix=""):
  """{dotted name: array} of parameters and persistent buffers, as torch's
  `Module.state_dict()` names them (`mapping.fc0.weight`)."""
  out = {}
  for name, value in {**module.params, **module.buffers}.items():
    if value is not None:
      out[prefix + name] = value
  for name, child in module.modules.items():
    if child is not None:
      out.update(state_dict(child, f"{prefix}{name}."))
  return out


def _plain(x):
  """Dict subclasses standing in for the file's containers → plain dicts."""
  if isinstance(x, dict):
    return {k: _plain(v) for k, v in x.items()}
  if isinstance(x, list):
    return [_plain(v) for v in x]
  if isinstance(x, tuple):
    return tuple(_plain(v) for v in x)
  return x


def _dict_of(x, what):
  if x is None:
    return {}
  if not isinstance(x, dict):
    raise RefusedPickle(f"{what} is a {type(x).__name__}, expected a dict")
  return x


# --- persistent objects -------------------------------------------------------

def _reconstruct_persistent_obj(meta):
  if not isinstance(meta, dict):
    raise RefusedPickle("a persistent object whose meta is not a dict")
  if meta.get("type") != "class":
    raise RefusedPickle(
        f"a persistent object of type {meta.get('type')!r} (only persistent "
        "classes, i.e. torch modules, are read)")
  name = meta.get("class_name")
  if not isinstance(name, str):
    raise RefusedPickle("a persistent object without a class_name")
  state = _dict_of(meta.get("state"), f"the state of {name}")
  skip = set(state.get("_non_persistent_buffers_set") or ())
  buffers = {k: v for k, v in _dict_of(state.get("_buffers"),
                                       f"{name}._buffers").items()
             if k not in skip}
  attrs = {k: v for k, v in state.items()
           if k not in _TORCH_INTERNALS and not k.startswith("_")}
  return PersistentModule(
      class_name=name, version=meta.get("version"),
      init_args=_plain(tuple(state.get("_init_args") or ())),
      init_kwargs=_plain(_dict_of(state.get("_init_kwargs"),
                                  f"{name}._init_kwargs")),
      params=_plain(_dict_of(state.get("_parameters"), f"{name}._parameters")),
      buffers=_plain(buffers),
      modules=_plain(_dict_of(state.get("_modules"), f"{name}._modules")),
      attrs=_plain(attrs))


# --- containers and numpy scalars ---------------------------------------------

def _ordered_dict(items=()):
  return dict(items)


def _codecs_encode(text, encoding):
  """How protocol ≤ 2 pickles bytes: _codecs.encode(str, 'latin1')."""
  if not isinstance(text, str) or encoding != "latin1":
    raise RefusedPickle(f"_codecs.encode(..., {encoding!r})")
  return text.encode("latin1")


class _EasyDict(dict):
  """`dnnlib.util.EasyDict` (a dict with attribute access) as a dict; the
  pickle rebuilds it with NEWOBJ + SETITEMS (+ an empty BUILD)."""

  def __setstate__(self, state):
    if state:
      raise RefusedPickle("a dnnlib.util.EasyDict with instance attributes")


class _DType:
  """A numeric `numpy.dtype`, rebuilt from its name and byte order only."""

  def __init__(self, name, align=False, copy=False):
    del align, copy  # layout flags; only plain numeric dtypes are accepted
    try:
      dt = np.dtype(name) if isinstance(name, str) else None
    except (TypeError, ValueError, SyntaxError):
      dt = None
    if dt is None or dt.kind not in "biufc" or dt.fields or dt.subdtype:
      raise RefusedPickle(f"numpy.dtype({name!r}): only numeric dtypes are read")
    self.np = dt

  def __setstate__(self, state):
    if (not isinstance(state, tuple) or len(state) < 5
        or any(s is not None for s in state[2:5])):
      raise RefusedPickle("a structured numpy.dtype")
    if state[1] in ("<", ">"):
      self.np = self.np.newbyteorder(state[1])


def _numpy_scalar(dtype, data=None):
  if not isinstance(dtype, _DType) or not isinstance(data, bytes) \
      or len(data) != dtype.np.itemsize:
    raise RefusedPickle("a numpy scalar that is not a plain number")
  return np.frombuffer(data, dtype.np)[0].item()


# --- tensors --------------------------------------------------------------------

@dataclasses.dataclass
class _Storage:
  dtype: Any
  numel: int
  array: Optional[np.ndarray] = None


def _int(x, what):
  if type(x) is not int:
    raise RefusedPickle(f"tensor {what} {x!r} is not an integer")
  return x


def _rebuild_tensor_v2(storage, offset, size, stride, requires_grad=False,
                       backward_hooks=None, metadata=None):
  del requires_grad
  if not isinstance(storage, _Storage) or storage.array is None:
    raise RefusedPickle("a tensor whose storage is not a torch storage")
  if backward_hooks or metadata:
    raise RefusedPickle("a tensor with backward hooks or metadata")
  if not isinstance(size, tuple) or not isinstance(stride, tuple) \
      or len(size) != len(stride):
    raise RefusedPickle("a tensor with malformed size/stride")
  offset = _int(offset, "offset")
  size = tuple(_int(s, "size") for s in size)
  stride = tuple(_int(s, "stride") for s in stride)
  if offset < 0 or min(size + stride, default=0) < 0:
    raise RefusedPickle("a tensor with negative offset, size or stride")
  if 0 in size:
    return np.zeros(size, storage.array.dtype)
  if np.prod(size, dtype=object) > storage.array.size:
    # Only zero strides give a view more elements than its storage; a
    # checkpoint never needs them, and they could ask for any amount of memory.
    raise RefusedPickle(f"a tensor of shape {size} over a storage of "
                        f"{storage.array.size} elements")
  last = offset + sum((n - 1) * s for n, s in zip(size, stride))
  if last >= storage.array.size:
    raise RefusedPickle(
        f"a tensor reaching element {last} of a storage of "
        f"{storage.array.size}")
  item = storage.array.itemsize
  view = np.lib.stride_tricks.as_strided(
      storage.array[offset:], shape=size, strides=[s * item for s in stride],
      writeable=False)
  return np.array(view)


def _rebuild_parameter(data, requires_grad=True, backward_hooks=None):
  del requires_grad
  if not isinstance(data, np.ndarray) or backward_hooks:
    raise RefusedPickle("a parameter that is not a plain tensor")
  return data


def _rebuild_parameter_with_state(data, requires_grad, backward_hooks, state):
  if state:
    raise RefusedPickle("a parameter with extra state")
  return _rebuild_parameter(data, requires_grad, backward_hooks)


class _StorageReader(pickle.Unpickler):
  """One pickle of a legacy torch.save stream: storage types only."""

  def __init__(self, f, storages=None):
    super().__init__(f)
    self._storages = storages

  def find_class(self, module, name):
    if module == "torch" and name in _STORAGE_DTYPES:
      return _STORAGE_DTYPES[name]
    raise RefusedPickle(f"global {module}.{name} inside a tensor storage")

  def persistent_load(self, pid):
    if self._storages is None:
      raise RefusedPickle("a persistent id outside a storage record")
    if (not isinstance(pid, tuple) or len(pid) != 6 or pid[0] != "storage"
        or pid[1] not in _STORAGE_DTYPES.values()):
      raise RefusedPickle(f"storage record {str(pid)[:80]}")
    _, dtype, key, _location, numel, view = pid
    if view is not None:
      raise RefusedPickle("a storage view (torch < 1.0 files)")
    return self._storages.setdefault(key, _Storage(dtype, _int(numel, "numel")))


def _load_from_bytes(data):
  """A storage saved by torch's legacy (non-zip) torch.save, as numpy."""
  if not isinstance(data, bytes):
    raise RefusedPickle("torch.storage._load_from_bytes of a non-bytes value")
  if not data.startswith(_LEGACY_HEADER):
    raise RefusedPickle("tensor bytes that are not a torch storage")
  f = io.BytesIO(data)
  storages = {}
  _StorageReader(f).load()
  if _StorageReader(f).load() != _LEGACY_PROTOCOL:
    raise RefusedPickle("a torch storage of an unknown format version")
  info = _StorageReader(f).load()
  if not isinstance(info, dict) or info.get("little_endian") is not True:
    raise RefusedPickle("a big-endian tensor storage")
  result = _StorageReader(f, storages).load()
  keys = _StorageReader(f).load()
  if not isinstance(keys, list) or set(keys) != set(storages):
    raise RefusedPickle("a tensor storage with an inconsistent key list")
  for key in keys:
    st = storages[key]
    count = int.from_bytes(f.read(8), "little", signed=True)
    dtype = np.dtype(st.dtype).newbyteorder("<")
    raw = f.read(count * dtype.itemsize)
    if count != st.numel or len(raw) != count * dtype.itemsize:
      raise RefusedPickle("a truncated tensor storage")
    st.array = np.frombuffer(raw, dtype).astype(st.dtype)
  if not isinstance(result, _Storage):
    raise RefusedPickle("tensor bytes that hold something else than a storage")
  return result


# --- the reader -----------------------------------------------------------------

_GLOBALS = {
    ("torch_utils.persistence", "_reconstruct_persistent_obj"):
        _reconstruct_persistent_obj,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"):
        _rebuild_parameter_with_state,
    ("torch.storage", "_load_from_bytes"): _load_from_bytes,
    ("collections", "OrderedDict"): _ordered_dict,
    ("dnnlib.util", "EasyDict"): _EasyDict,
    ("dnnlib", "EasyDict"): _EasyDict,
    ("builtins", "set"): set,
    ("builtins", "frozenset"): frozenset,
    ("__builtin__", "set"): set,  # protocol ≤ 2 spelling
    ("__builtin__", "frozenset"): frozenset,
    ("_codecs", "encode"): _codecs_encode,
    ("numpy", "dtype"): _DType,
    ("numpy.core.multiarray", "scalar"): _numpy_scalar,
    ("numpy._core.multiarray", "scalar"): _numpy_scalar,
}


class _Reader(pickle.Unpickler):

  def find_class(self, module, name):
    try:
      return _GLOBALS[(module, name)]
    except KeyError:
      raise RefusedPickle(f"global {module}.{name}") from None

  def persistent_load(self, pid):
    raise RefusedPickle(f"persistent id {str(pid)[:80]}")


def is_pickle(path):
  """True for a raw pickle (NVIDIA's .pkl), False for torch.save files (zip
  or legacy) and anything else, a missing file included."""
  if not os.path.isfile(path):
    return False
  with open(path, "rb") as f:
    head = f.read(len(_LEGACY_HEADER))
  return (head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04",
                                                b"\x05")
          and head != _LEGACY_HEADER)


def load(path):
  """Reads an NVIDIA network pickle into plain data without executing it.

  Returns the top-level object (a dict for NVIDIA's files), with every torch
  module a `PersistentModule` and every tensor a numpy array. Raises
  RefusedPickle naming the first global, persistent id or object it does not
  build.
  """
  if not os.path.isfile(path):
    raise ConversionError(f"{path}: no such file")
  try:
    with open(path, "rb") as f:
      return _plain(_Reader(f).load())
  except RefusedPickle as e:
    raise RefusedPickle(
        f"{path}: refused {e} — this reader builds only torch tensors, plain "
        "containers and NVIDIA persistent modules (as data); nothing in the "
        "file was executed.") from None
  except (pickle.UnpicklingError, EOFError, ValueError, TypeError,
          AttributeError, IndexError, KeyError, RecursionError,
          MemoryError) as e:
    raise ConversionError(
        f"{path}: not a readable network pickle ({type(e).__name__}: "
        f"{str(e)[:200]})") from None
