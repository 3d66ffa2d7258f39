"""The deghosting network of differential-activation editing (Song et al.,
"Editing Out-of-domain GAN Inversion via Differential Activations", ECCV
2022; `model/deghosting/deghosting.py` of HaoruiSong622/Editing-Out-of-Domain).

A GLEAN-like restorer with a StyleGAN2 prior, in_size² → out_size² (released:
128² → 1024²), inference only:

  * encoder: an RRDBNet (num_rrdbs RRDB blocks at the input's resolution,
    then a conv to its generator width and leaky ReLU), stride-2 conv pairs
    down to 4², and at 4² a conv and a linear layer to the W+ codes
    (2·log2(out_size) − 2 latents, no mapping network, no latent average);
  * the generator (mmediting's StyleGANv2Generator: this project's
    generator, `dhr_jax.models.stylegan2`, converted with config
    pixel_norm 'mmediting') runs on those codes with its fixed noise
    buffers; through its layer hook the encoder feature e of each
    resolution r ≤ in_size is fused into the feature x leaving that
    resolution (before the upsampling conv to 2r), conv(concat(x, e)), and
    into the RGB skip there, conv(concat(skip, e)), and the features
    leaving the resolutions above in_size are read;
  * decoder: from the RRDBNet output, pixel-shuffle ×2 stages, each
    resolution above in_size concatenated with the generator's feature
    there, then conv, leaky ReLU, conv to RGB at out_size².

The generator's own image (its skip path) is not part of the output: the
published forward fuses into it but returns only the decoder's image.

Convert the released file with `python -m converters.deghosting --src
deghosting.pt --dst DIR` and load it with `dhr_jax.load_deghosting(DIR)`.
"""
import functools
import math
from typing import Any, Sequence

import flax.linen as nn
from flax import struct
import jax
import jax.numpy as jnp

from dhr_jax import checkpoint
from dhr_jax.models.frozen import freeze
from dhr_jax.models.stylegan2 import Generator

KIND = "deghosting"
# The decoder's last hidden width (fixed in the published code).
DECODER_HIDDEN = 64


def _lrelu(x):
  return nn.leaky_relu(x, 0.2)


def _conv(features, name, stride=1):
  """PyTorch's Conv2d(·, features, 3, stride, padding=1)."""
  return nn.Conv(features, (3, 3), (stride, stride), ((1, 1), (1, 1)),
                 name=name)


def pixel_shuffle(x, r):
  """F.pixel_shuffle on NHWC: channel c·r² + i·r + j → pixel (h·r+i, w·r+j)."""
  b, h, w, c = x.shape
  x = x.reshape(b, h, w, c // (r * r), r, r)
  x = jnp.transpose(x, (0, 1, 4, 2, 5, 3))
  return x.reshape(b, h * r, w * r, c // (r * r))


class ResidualDenseBlock(nn.Module):
  """Five densely connected convs; the last, scaled by 0.2, is a residual."""
  mid: int
  growth: int

  @nn.compact
  def __call__(self, x):
    dense = [x]
    for i in range(1, 5):
      dense.append(_lrelu(_conv(self.growth, f"conv{i}")(
          jnp.concatenate(dense, -1))))
    return _conv(self.mid, "conv5")(jnp.concatenate(dense, -1)) * 0.2 + x


class RRDBNet(nn.Module):
  """conv_first → RRDB blocks (three dense blocks each, residual ×0.2) →
  conv_body, residual; conv_up and leaky ReLU."""
  mid: int
  growth: int
  num_blocks: int
  out: int

  @nn.compact
  def __call__(self, x):
    feat = _conv(self.mid, "conv_first")(x)
    body = feat
    for b in range(self.num_blocks):
      y = body
      for r in (1, 2, 3):
        y = ResidualDenseBlock(self.mid, self.growth,
                               name=f"body_{b}_rdb{r}")(y)
      body = y * 0.2 + body
    feat = feat + _conv(self.mid, "conv_body")(body)
    return _lrelu(_conv(self.out, "conv_up")(feat))


class PixelShufflePack(nn.Module):
  """conv to 4× the channels, then pixel shuffle ×2."""
  features: int

  @nn.compact
  def __call__(self, x):
    return pixel_shuffle(_conv(self.features * 4, "upsample_conv")(x), 2)


class FCN(nn.Module):
  """The published `FCN`: encoder, fusion convs and decoder around the
  generator, which `synthesize(latent, layer_fn)` runs (returning nothing;
  layer_fn reads what it needs). Submodule names follow the released keys
  ('encoder.1.0' → 'encoder_1_0', 'body.3.rdb1' → 'body_3_rdb1')."""
  in_size: int
  out_size: int
  channels: Sequence[int]   # per resolution 4, 8, …, out_size
  rrdb_channels: int
  growth_channels: int
  num_rrdbs: int
  style_channels: int

  def _ch(self, r):
    return self.channels[int(math.log2(r)) - 2]

  @nn.compact
  def __call__(self, lq, synthesize):
    b = lq.shape[0]
    n_latent = 2 * int(math.log2(self.out_size)) - 2
    x = RRDBNet(self.rrdb_channels, self.growth_channels, self.num_rrdbs,
                self._ch(self.in_size), name="encoder_0")(lq)
    hr, feats = x, {self.in_size: x}
    r, i = self.in_size, 1
    while r > 4:
      x = _lrelu(_conv(self._ch(r // 2), f"encoder_{i}_0", 2)(x))
      x = _lrelu(_conv(self._ch(r // 2), f"encoder_{i}_2")(x))
      r, i = r // 2, i + 1
      feats[r] = x
    x = _lrelu(_conv(self._ch(4), f"encoder_{i}_0")(x))
    # torch's Flatten of an NCHW map is channel-major.
    x = jnp.transpose(x, (0, 3, 1, 2)).reshape(b, -1)
    latent = nn.Dense(n_latent * self.style_channels,
                      name=f"encoder_{i}_3")(x)
    latent = latent.reshape(b, n_latent, self.style_channels)

    fusion = {}
    r, j = 4, 0
    while r <= self.in_size:
      fusion[r] = (_conv(self._ch(r), f"fusion_out_{j}"),
                   _conv(3, f"fusion_skip_{j}"))
      r, j = r * 2, j + 1
    read = []

    def layer_fn(k, x, skip):
      # Odd k: the feature leaving a resolution (entering the next one's
      # upsampling conv, or the last conv's output) and its RGB skip.
      if k % 2 == 0:
        return x, skip
      r = x.shape[1]
      if r <= self.in_size:
        out_conv, skip_conv = fusion[r]
        e = feats[r]
        return (out_conv(jnp.concatenate([x, e], -1)),
                skip_conv(jnp.concatenate([skip, e], -1)))
      read.append(x)
      return x, skip

    synthesize(latent, layer_fn)

    r, i = self.in_size, 0
    while r < self.out_size:
      if i > 0:
        hr = jnp.concatenate([hr, read[i - 1]], -1)
      hr = PixelShufflePack(self._ch(2 * r), name=f"decoder_{i}")(hr)
      r, i = r * 2, i + 1
    if i > 0:
      hr = jnp.concatenate([hr, read[i - 1]], -1)
    hr = _lrelu(_conv(DECODER_HIDDEN, f"decoder_{i}_0")(hr))
    return _conv(3, f"decoder_{i}_2")(hr)


def make_config(in_size, out_size, channels, rrdb_channels, growth_channels,
                num_rrdbs, generator):
  """channels: {resolution: C} for 4 … out_size; generator: its config."""
  for name, s in (("in_size", in_size), ("out_size", out_size)):
    if s < 4 or 2 ** int(math.log2(s)) != s:
      raise ValueError(f"{name} must be a power of two ≥ 4, got {s}")
  if not in_size <= out_size:
    raise ValueError(f"in_size {in_size} exceeds out_size {out_size}")
  res = [2 ** i for i in range(2, int(math.log2(out_size)) + 1)]
  return {"in_size": int(in_size), "out_size": int(out_size),
          "channels": {str(r): int(channels[r]) for r in res},
          "rrdb_channels": int(rrdb_channels),
          "growth_channels": int(growth_channels),
          "num_rrdbs": int(num_rrdbs),
          "generator": dict(generator)}


def _fcn(config):
  c = config
  res = [2 ** i for i in range(2, int(math.log2(c["out_size"])) + 1)]
  return FCN(c["in_size"], c["out_size"],
             tuple(c["channels"][str(r)] for r in res), c["rrdb_channels"],
             c["growth_channels"], c["num_rrdbs"],
             c["generator"]["style_dim"])


@functools.partial(jax.jit, static_argnums=0)
def _deghost(config, params, lq):
  G = Generator(config["generator"], None, None)
  noise = [params["noise"][str(i)]
           for i in range(config["generator"]["num_layers"])]

  def synthesize(latent, layer_fn):
    G.synthesis(params["generator"], latent, noise, layer_fn=layer_fn)

  return _fcn(config).apply({"params": params["fcn"]}, lq, synthesize)


@struct.dataclass
class Deghoster:
  """A loaded deghosting network, as a pytree.

  Attributes:
    params: {'fcn': encoder, fusion and decoder weights, 'generator':
      {'mapping', 'synthesis'} as `Generator.params`, 'noise': {'0': …}
      the generator's fixed noise maps (NHWC)}.
    config: read-only dict: in_size, out_size, channels, rrdb_channels,
      growth_channels, num_rrdbs, generator (its `Generator` config).
  """
  params: Any
  config: dict = struct.field(pytree_node=False)

  def __post_init__(self):
    object.__setattr__(self, "config", freeze(self.config))

  @property
  def generator(self):
    """The network's StyleGAN2 prior as a `Generator` (mapping included)."""
    n = self.config["generator"]["num_layers"]
    return Generator(self.config["generator"], self.params["generator"],
                     [self.params["noise"][str(i)] for i in range(n)])

  def deghost(self, params, lq):
    """lq (B, in_size, in_size, 3) in [−1, 1], NHWC → (B, out_size,
    out_size, 3)."""
    lq = jnp.asarray(lq, jnp.float32)
    s = self.config["in_size"]
    if lq.ndim != 4 or lq.shape[1:] != (s, s, 3):
      raise ValueError(f"deghost expects (B, {s}, {s}, 3) images (NHWC, "
                       f"the network's in_size), got {lq.shape}")
    return _deghost(self.config, params, lq)


def param_shapes(config):
  """{'fcn': shapes of the FCN's parameter tree}, no compute."""
  c = config
  lq = jax.ShapeDtypeStruct((1, c["in_size"], c["in_size"], 3), jnp.float32)
  G = Generator(c["generator"], None, None)

  def synthesize(latent, layer_fn):
    # Shapes only: the fused features' shapes are the generator's.
    x = jnp.zeros((latent.shape[0], 4, 4, G.config["channels"]["4"]))
    skip = jnp.zeros((latent.shape[0], 4, 4, 3))
    for k in range(1, G.config["num_layers"] + 1, 2):
      r = 4 * 2 ** (k // 2)
      x = jnp.zeros((latent.shape[0], r, r, G.config["channels"][str(r)]))
      skip = jnp.zeros((latent.shape[0], r, r, 3))
      layer_fn(k, x, skip)

  return jax.eval_shape(
      lambda x: _fcn(c).init(jax.random.PRNGKey(0), x, synthesize), lq
  )["params"]


def load(path):
  """Loads a deghosting network written by `python -m converters.deghosting`
  (the directory, or a bundle holding deghosting/)."""
  directory = checkpoint.find(path, KIND)
  tree, config = checkpoint.load(directory, KIND)
  if set(tree) != {"fcn", "generator", "noise"}:
    raise checkpoint.CheckpointError(
        f"{directory} is not a deghosting network written by "
        f"converters.deghosting (entries {sorted(tree)}); re-run the "
        "converter.")
  return Deghoster(params=tree, config=config)
