"""StyleGAN2 generator (the rosinality PyTorch architecture) in Flax.

Same function as the PyTorch generator that released FFHQ checkpoints and the
decoders of e4e/pSp/PTI/HFGI were trained with; checked against outputs of the
official code in tests/test_stylegan2.py.

Parameter names mirror the official state dict: `convs.3.conv.weight` is
params['synthesis']['convs_3']['conv']['weight'], `style.1.weight` is
params['mapping']['style_1']['weight']; shapes are the PyTorch ones.

The layer hook: synthesis visits layers k = 0 … num_layers, where k names the
feature map entering the convolution that consumes latent k (k = 11 is the
128² map of a 1024² generator, DHR's default; k = num_layers is the last
convolution's output). `layer_fn(k, x, skip) → (x, skip)` sees every one of
them with the RGB skip summed so far and may replace both: the deghosting
network (models/deghosting.py) fuses its encoder's features into both paths
at its input's resolutions and reads the features above. The one-layer
feature hook is that hook at one k: `feature_idx` k, returning the map
and/or replacing it with `f·mask + offset·(1 − mask)` (`f + offset` without
a mask), or any `feature_fn` (HFGI's f·(1 + scale) + shift). Every method
that edits features (DHR, weight-only, feature-only, HFGI) goes through it.

mmediting's StyleGANv2Generator (the deghosting network's) is this
generator under other names (converters/deghosting.py maps them) up to its
mapping's PixelNorm, z / (‖z‖₂/√C + 1e-6) instead of z·rsqrt(mean z² +
1e-8): config `pixel_norm` 'mmediting'.

NVIDIA's stylegan2-ada-pytorch generator (architecture 'skip', unconditional)
is the same function up to one difference, carried as config: `conv_clamp`
clamps each synthesis layer's output (after bias, leaky ReLU and its √2 gain)
and each ToRGB output (after its bias, before the skip sum) to ±conv_clamp.
Its z normalisation (normalize_2nd_moment) is PixelNorm, its w_avg is
`latent_avg`; its z and hidden mapping widths, independent of w_dim there,
are config (`z_dim`, `layer_features`; both style_dim for rosinality's);
converters/stylegan2_ada.py maps its weights. Layers NVIDIA
runs in fp16 (num_fp16_res) run in float32 here.
"""
import functools
import math
from typing import Any, Callable, Optional, Sequence, Tuple

import flax.linen as nn
from flax import struct
import jax
import jax.numpy as jnp
import numpy as np

from dhr_jax import checkpoint
from dhr_jax.models import ops
from dhr_jax.models.frozen import freeze

KIND = "generator"
OFFICIAL_CHANNELS = {4: 512, 8: 512, 16: 512, 32: 512, 64: 256, 128: 128,
                     256: 64, 512: 32, 1024: 16}  # ×channel_multiplier from 64 up


def official_channels(size, channel_multiplier=2):
  """{resolution: channels} of the official generator of `size`."""
  out = {}
  r = 4
  while r <= size:
    c = OFFICIAL_CHANNELS[r]
    out[r] = c * channel_multiplier if r >= 64 else c
    r *= 2
  return out


def feature_resolution(feature_idx):
  """Spatial size of the hooked feature k: 4, 4, 8, 8, 16, 16, ... (4·2^⌊k/2⌋)."""
  return 4 * 2 ** (feature_idx // 2)


def _normal(scale=1.0):
  def init(key, shape, dtype=jnp.float32):
    return jax.random.normal(key, shape, dtype) * scale
  return init


class EqualLinear(nn.Module):
  """Linear layer with equalised learning rate (weights stored as (out, in))."""
  features: int
  lr_mul: float = 1.0
  bias_init: float = 0.0
  activate: bool = False

  @nn.compact
  def __call__(self, x):
    in_f = x.shape[-1]
    w = self.param("weight", _normal(1.0 / self.lr_mul), (self.features, in_f))
    b = self.param("bias", nn.initializers.constant(self.bias_init),
                   (self.features,))
    y = x @ (w * (self.lr_mul / math.sqrt(in_f))).T
    if self.activate:
      return ops.fused_leaky_relu(y, b * self.lr_mul)
    return y + b * self.lr_mul


class ModulatedConv(nn.Module):
  features: int
  kernel_size: int
  demodulate: bool = True
  upsample: bool = False

  @nn.compact
  def __call__(self, x, w):
    in_c = x.shape[-1]
    weight = self.param("weight", _normal(),
                        (1, self.features, in_c, self.kernel_size,
                         self.kernel_size))
    style = EqualLinear(in_c, bias_init=1.0, name="modulation")(w)
    return ops.modulated_conv(
        x, style, weight, demodulate=self.demodulate, upsample=self.upsample,
        blur_kernel=ops.fir_kernel(gain=4.0))


def _clamp(x, limit):
  """NVIDIA's conv_clamp (bias_act's `clamp`); None leaves x unbounded."""
  return x if limit is None else jnp.clip(x, -limit, limit)


class NoiseInjection(nn.Module):
  @nn.compact
  def __call__(self, x, noise):
    strength = self.param("weight", nn.initializers.zeros, (1,))
    return x + strength * noise


class FusedLeakyReLU(nn.Module):
  """leaky_relu(x + b)·√2, then clamped to ±clamp when clamp is set."""
  clamp: Optional[float] = None

  @nn.compact
  def __call__(self, x):
    b = self.param("bias", nn.initializers.zeros, (x.shape[-1],))
    return _clamp(ops.fused_leaky_relu(x, b), self.clamp)


class StyledConv(nn.Module):
  features: int
  upsample: bool = False
  conv_clamp: Optional[float] = None

  @nn.compact
  def __call__(self, x, w, noise):
    x = ModulatedConv(self.features, 3, upsample=self.upsample, name="conv")(x, w)
    x = NoiseInjection(name="noise")(x, noise)
    return FusedLeakyReLU(self.conv_clamp, name="activate")(x)


class ToRGB(nn.Module):
  """conv + bias, clamped like the synthesis layers, + the upsampled skip."""
  conv_clamp: Optional[float] = None

  @nn.compact
  def __call__(self, x, w, skip=None):
    y = ModulatedConv(3, 1, demodulate=False, name="conv")(x, w)
    y = y + self.param("bias", nn.initializers.zeros, (1, 3, 1, 1)).reshape(1, 1, 1, 3)
    y = _clamp(y, self.conv_clamp)
    if skip is not None:
      y = y + ops.upsample_2x(skip, ops.fir_kernel(gain=4.0), (2, 1))
    return y


class ConstantInput(nn.Module):
  """The learned 4×4 start of synthesis, stored (1, C, 4, 4) as official."""
  channels: int

  @nn.compact
  def __call__(self, batch):
    const = self.param("input", _normal(), (1, self.channels, 4, 4))
    return jnp.tile(jnp.transpose(const, (0, 2, 3, 1)), (batch, 1, 1, 1))


class Mapping(nn.Module):
  """z → w: PixelNorm, then n_mlp equalised linear layers (lr ×0.01).

  The z width is the input's. layer_features: the width of the hidden
  layers (NVIDIA's `layer_features`), None for style_dim as rosinality's.
  """
  style_dim: int
  n_mlp: int
  lr_mlp: float = 0.01
  layer_features: Optional[int] = None
  pixel_norm: Optional[str] = None  # None: rosinality's (and NVIDIA's)

  @nn.compact
  def __call__(self, z):
    if self.pixel_norm == "mmediting":
      # Its epsilon is added to the RMS, not to the mean square.
      x = z / (jnp.sqrt(jnp.mean(z * z, axis=-1, keepdims=True)) + 1e-6)
    else:
      x = ops.pixel_norm(z)
    hidden = self.layer_features or self.style_dim
    for i in range(1, self.n_mlp + 1):  # official names start at style.1
      x = EqualLinear(self.style_dim if i == self.n_mlp else hidden,
                      lr_mul=self.lr_mlp, activate=True,
                      name=f"style_{i}")(x)
    return x


LayerHook = Callable[[int, jnp.ndarray, Optional[jnp.ndarray]],
                     Tuple[jnp.ndarray, Optional[jnp.ndarray]]]


def _no_hook(k, x, skip):
  del k
  return x, skip


class Synthesis(nn.Module):
  """W+ codes (B, n_latent, style_dim) → image (B, size, size, 3).

  `hook(k, x, skip) → (x, skip)` is called at every layer k = 0 …
  num_layers (see the module docstring); x is the feature entering the conv
  of latent k, skip the image the ToRGB layers have summed so far (None at
  k = 0, where what the hook returns for it is not used); at k =
  num_layers the skip it returns is the image (the x it returns is unused).
  """
  channels: Sequence[int]  # per resolution 4, 8, ..., size
  conv_clamp: Optional[float] = None

  @nn.compact
  def __call__(self, wplus, noise, hook: Optional[LayerHook] = None):
    hook = hook or _no_hook
    x = ConstantInput(self.channels[0], name="input")(wplus.shape[0])
    x, _ = hook(0, x, None)
    clamp = self.conv_clamp
    x = StyledConv(self.channels[0], conv_clamp=clamp, name="conv1")(
        x, wplus[:, 0], noise[0])
    skip = ToRGB(clamp, name="to_rgb1")(x, wplus[:, 1])
    for j, c in enumerate(self.channels[1:]):
      i = 2 * j + 1
      x, skip = hook(i, x, skip)
      x = StyledConv(c, upsample=True, conv_clamp=clamp,
                     name=f"convs_{2 * j}")(x, wplus[:, i], noise[i])
      x, skip = hook(i + 1, x, skip)
      x = StyledConv(c, conv_clamp=clamp, name=f"convs_{2 * j + 1}")(
          x, wplus[:, i + 1], noise[i + 1])
      skip = ToRGB(clamp, name=f"to_rgbs_{j}")(x, wplus[:, i + 2], skip)
    _, skip = hook(2 * len(self.channels) - 1, x, skip)
    return skip


def feature_blend(offset, mask=None):
  """The DHR hook: f ↦ f·mask + offset·(1 − mask), or f + offset without mask."""
  if mask is None:
    return lambda f: f + offset
  return lambda f: f * mask + offset * (1.0 - mask)


def feature_modulation(scale, shift):
  """The HFGI hook: f ↦ f·(1 + scale) + shift (distortion consultation)."""
  return lambda f: f * (1.0 + scale) + shift


def truncate(w, psi, w_avg):
  """Truncation trick: w_avg + psi·(w − w_avg).

  With `w_avg = G.latent_avg` this is the public truncation API:
  `truncate(G.mapping(G.params, z), 0.7, G.latent_avg)` (or `G(params, z,
  truncation=0.7)` for the image). For a generator converted from an NVIDIA
  pickle latent_avg is the file's `mapping.w_avg`, so this equals NVIDIA's
  `G.mapping(z, c, truncation_psi=0.7)` (without truncation_cutoff).
  """
  return w_avg + psi * (w - w_avg)


def generator_config(size, style_dim, n_mlp, channels, lr_mlp=0.01,
                     conv_clamp=None, z_dim=None, layer_features=None,
                     pixel_norm=None):
  """The config dict stored with a checkpoint; channels: {res: C} or one int.

  conv_clamp: NVIDIA's clamp of every synthesis layer's and ToRGB's output
  to ±conv_clamp (256 in NVIDIA-trained stylegan2-ada nets); None for the
  rosinality generator and TF-converted nets.
  z_dim, layer_features: the widths of z and of the hidden mapping layers;
  None for style_dim, as in rosinality's generator (NVIDIA's networks set
  them independently of w_dim = style_dim).
  pixel_norm: 'mmediting' for mmediting's PixelNorm in the mapping; None
  (rosinality's, NVIDIA's) leaves the key out of the config.
  """
  log_size = int(math.log2(size))
  if 2 ** log_size != size or size < 8:
    raise ValueError(f"size must be a power of two ≥ 8, got {size}")
  res = [2 ** i for i in range(2, log_size + 1)]
  if isinstance(channels, int):
    channels = {r: channels for r in res}
  cm = None
  for m in (1, 2, 4):
    if all(official_channels(size, m)[r] == channels[r] for r in res):
      cm = m
      break
  if pixel_norm not in (None, "mmediting"):
    raise ValueError(f"pixel_norm must be None or 'mmediting', got "
                     f"{pixel_norm!r}")
  config = {
      "size": size, "style_dim": style_dim, "n_mlp": n_mlp,
      "channel_multiplier": cm, "lr_mlp": lr_mlp,
      "channels": {str(r): int(channels[r]) for r in res},
      "n_latent": 2 * log_size - 2, "num_layers": 2 * log_size - 3,
      "conv_clamp": None if conv_clamp is None else float(conv_clamp),
      "z_dim": int(z_dim or style_dim),
      "layer_features": int(layer_features or style_dim),
  }
  if pixel_norm is not None:
    config["pixel_norm"] = pixel_norm
  return config


def complete_config(config):
  """`config` with the widths a config written before they were recorded
  leaves out (`z_dim`, `layer_features`: style_dim, as rosinality's), so
  that configs of the same architecture compare equal."""
  c = dict(config)
  c.setdefault("z_dim", c["style_dim"])
  c.setdefault("layer_features", c["style_dim"])
  return c


def noise_shapes(config):
  """NHWC shapes of the per-layer noise maps (official `noises.noise_i`)."""
  return [(1, 2 ** ((i + 5) // 2), 2 ** ((i + 5) // 2), 1)
          for i in range(config["num_layers"])]


@functools.partial(jax.jit, static_argnums=1)
def _random_noise(key, shapes):
  # One draw sliced into maps: a random-number kernel per shape would each
  # take long to compile on CPU.
  sizes = [int(np.prod(s)) for s in shapes]
  flat = jax.random.normal(key, (sum(sizes),))
  ends = np.cumsum(sizes)
  return [flat[e - n:e].reshape(s) for e, n, s in zip(ends, sizes, shapes)]


@struct.dataclass
class Generator:
  """A generator as a pytree: weights and fixed noise are its leaves, the
  architecture config its static part.

  `mapping` and `synthesis` take params explicitly so they can be jitted,
  differentiated and vmapped over params (each image its own copy). The
  generator itself can be a jit argument: `jax.jit(lambda G, w:
  G.synthesis(G.params, w))(G, w)` traces once per architecture (config)
  and array shapes, and reuses the program for other weights or noise.
  `config` is a read-only dict (`FrozenConfig`); build a changed generator
  with `G.replace(params=...)`.
  """
  config: dict = struct.field(pytree_node=False)
  params: Any
  noise: list
  latent_avg: Optional[jnp.ndarray] = None

  def __post_init__(self):
    # Also runs when jax rebuilds the pytree; freeze() is a no-op then.
    object.__setattr__(self, "config", freeze(self.config))

  @property
  def mapping_module(self):
    """The Flax mapping network of this config (converters and init read
    its parameter shapes)."""
    c = self.config
    return Mapping(c["style_dim"], c["n_mlp"], c.get("lr_mlp", 0.01),
                   c.get("layer_features"), c.get("pixel_norm"))

  @property
  def synthesis_module(self):
    """The Flax synthesis network of this config."""
    c = self.config
    return Synthesis(tuple(c["channels"][str(2 ** i)]
                           for i in range(2, int(math.log2(c["size"])) + 1)),
                     c.get("conv_clamp"))

  @property
  def n_latent(self):
    return self.config["n_latent"]

  @property
  def z_dim(self):
    """Width of z; style_dim unless the config says otherwise (checkpoints
    written before z_dim was recorded are rosinality-shaped)."""
    return self.config.get("z_dim") or self.config["style_dim"]

  def mapping(self, params, z):
    """z (B, z_dim) → w (B, style_dim)."""
    if z.shape[-1] != self.z_dim:
      raise ValueError(f"z must be (B, {self.z_dim}), got {z.shape}")
    return self.mapping_module.apply({"params": params["mapping"]}, z)

  def synthesis(self, params, wplus, noise=None, *, feature_idx=None,
                return_feature=False, offset=None, mask=None,
                feature_fn=None, layer_fn: Optional[LayerHook] = None):
    """W+ (B, n_latent, style_dim) → image (B, H, W, 3) [, feature].

    noise: list of NHWC maps (default: this generator's fixed noise).
    feature_idx: where the one-layer hook acts; with `offset` the feature
    there is replaced by f·mask + offset·(1−mask) (f + offset when mask is
    None), with `feature_fn` by feature_fn(f) (e.g. `feature_modulation`);
    with `return_feature` the feature before replacement is returned too.
    layer_fn(k, x, skip) → (x, skip): the layer hook, called at every layer
    k = 0 … num_layers (module docstring), after the one-layer hook at its
    k. To read features, append them to a list it closes over.
    """
    if wplus.ndim != 3 or wplus.shape[1] != self.n_latent:
      raise ValueError(
          f"wplus must be (B, {self.n_latent}, {self.config['style_dim']}), "
          f"got {wplus.shape}")
    noise = self.noise if noise is None else noise
    if offset is not None:
      if feature_fn is not None:
        raise ValueError("give either offset (and mask) or feature_fn")
      feature_fn = feature_blend(offset, mask)
    if feature_idx is not None:
      if not 0 <= feature_idx < self.config["num_layers"]:
        raise ValueError(f"feature_idx must be in [0, "
                         f"{self.config['num_layers']}), got {feature_idx}")
    elif feature_fn is not None or return_feature:
      raise ValueError("offset/feature_fn/return_feature need a feature_idx")
    taken = []

    def hook(k, x, skip):
      if k == feature_idx:
        taken.append(x)
        if feature_fn is not None:
          x = feature_fn(x)
      if layer_fn is not None:
        x, skip = layer_fn(k, x, skip)
      return x, skip

    use_hook = feature_idx is not None or layer_fn is not None
    img = self.synthesis_module.apply({"params": params["synthesis"]}, wplus,
                                noise, hook if use_hook else None)
    return (img, taken[0]) if return_feature else img

  def __call__(self, params, z, noise=None, truncation=1.0, **kw):
    """z → image through mapping, optional truncation, broadcast to W+."""
    w = self.mapping(params, z)
    if truncation != 1.0:
      if self.latent_avg is None:
        raise ValueError("truncation needs latent_avg (use mean_latent)")
      w = truncate(w, truncation, self.latent_avg)
    wplus = jnp.repeat(w[:, None], self.n_latent, axis=1)
    return self.synthesis(params, wplus, noise, **kw)

  def make_noise(self, key):
    """Fresh N(0, 1) noise maps with the checkpoint's shapes."""
    return _random_noise(key, tuple(noise_shapes(self.config)))

  def mean_latent(self, params, key, n=4096):
    """Mean of mapping(z) over n random z: the usual W-space average."""
    z = jax.random.normal(key, (n, self.z_dim))
    return jnp.mean(self.mapping(params, z), axis=0)


def init_generator(key, size=32, style_dim=64, n_mlp=2, channels=64,
                   lr_mlp=0.01, noise_strength=0.1, conv_clamp=None,
                   z_dim=None, layer_features=None):
  """A stand-in generator with seeded random weights (tests, demo).

  Noise strengths are set to `noise_strength` (the official init is 0, which
  would hide noise-handling mistakes from the tests that use this).
  """
  config = generator_config(size, style_dim, n_mlp, channels, lr_mlp,
                            conv_clamp, z_dim, layer_features)
  g = Generator(config, None, None)
  k_init, k_noise, k_avg = jax.random.split(key, 3)
  noise = g.make_noise(k_noise)
  # Shapes by tracing only, values by the official init rules in numpy:
  # running Flax's init would compile a whole forward pass just to draw
  # random numbers, which costs seconds per test.
  shapes = {
      "mapping": jax.eval_shape(g.mapping_module.init, k_init,
                                jnp.zeros((1, g.z_dim)))["params"],
      "synthesis": jax.eval_shape(
          g.synthesis_module.init, k_init,
          jnp.zeros((1, config["n_latent"], style_dim)), noise)["params"],
  }
  rng = np.random.default_rng(np.asarray(jax.random.key_data(k_init)).ravel())

  def draw(path, leaf):
    names = [k.key for k in path]
    if names[-2:] == ["noise", "weight"]:
      value = np.full(leaf.shape, noise_strength)
    elif names[-2:] == ["modulation", "bias"]:
      value = np.ones(leaf.shape)
    elif names[-1] == "bias":
      value = np.zeros(leaf.shape)
    elif names[0] == "mapping":
      value = rng.standard_normal(leaf.shape) / lr_mlp
    else:
      value = rng.standard_normal(leaf.shape)
    return jnp.asarray(value, jnp.float32)

  params = jax.tree_util.tree_map_with_path(draw, shapes)
  g = Generator(config, params, noise)
  return g.replace(latent_avg=jax.jit(g.mean_latent)(params, k_avg))


def load(path):
  """Loads a generator written by `python -m converters.stylegan2` (or a bundle)."""
  directory = checkpoint.find(path, KIND)
  tree, config = checkpoint.load(directory, KIND)
  noise = [tree["noise"][str(i)] for i in range(config["num_layers"])]
  return Generator(config, tree["params"], noise, tree.get("latent_avg"))
