"""FaRL face parsing (facer's `celebm/448` model) in Flax, for Domain-Specific Segmentation.

Network: FaRL-B/16 visual transformer on a 448² crop → token maps after
blocks 3, 5, 7, 11 → four FPN branches (112², 56², 28², 14²) → mmseg UPerHead
→ 19-class logits resized to 512². Inference only: BatchNorm uses its running
statistics.

Every bilinear resize is PyTorch's `interpolate(mode='bilinear',
align_corners=False)` (half-pixel centres, clamped at the border, never
antialiased): `ops.resize_bilinear_torch`, small interpolation matrices, so
up- and downsampling agree with the PyTorch model to rounding.

Public entry point: `load(path)` (`dhr_jax.load_parser`) → `Parser` with `.params`, `.config`,
`.parse(params, images)` and `.logits(params, x448)`.
"""
import functools
from typing import Any, Sequence

import flax.linen as nn
from flax import struct
import jax
import jax.numpy as jnp
import numpy as np

from dhr_jax import alignment
from dhr_jax import checkpoint
from dhr_jax.models import ops
from dhr_jax.models.frozen import freeze

KIND = "farl"

# CelebAMask-HQ labels in the order of the classifier's channels.
CELEBM_LABELS = (
    "background", "neck", "face", "cloth", "rr", "lr", "rb", "lb", "re", "le",
    "nose", "imouth", "llip", "ulip", "hair", "glass", "hat", "earr", "neckl")

# facer's celebm/448 network: FaRL-B/16 (CLIP ViT-B/16 layout) + UPerHead.
DEFAULT_CONFIG = dict(
    width=768, layers=12, heads=12, patch_size=16, input_size=448,
    output_indices=(3, 5, 7, 11), channels=768, pool_scales=(1, 2, 3, 6),
    num_classes=19, out_size=512, labels=CELEBM_LABELS,
    face_scale=alignment.CELEBM_FACE_SCALE)


# ------------------------------------------------------------------- encoder

def quick_gelu(x):
  return x * jax.nn.sigmoid(1.702 * x)


class MultiheadAttention(nn.Module):
  """Self-attention with packed q/k/v projections (torch.nn.MultiheadAttention)."""
  heads: int

  @nn.compact
  def __call__(self, x):
    b, n, d = x.shape
    qkv = nn.Dense(3 * d, name="in_proj")(x)
    qkv = qkv.reshape(b, n, 3, self.heads, d // self.heads)
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    q = q / np.sqrt(d // self.heads).astype(np.float32)
    attn = jax.nn.softmax(jnp.einsum("bqhd,bkhd->bhqk", q, k), axis=-1)
    out = jnp.einsum("bhqk,bkhd->bqhd", attn, v).reshape(b, n, d)
    return nn.Dense(d, name="out_proj")(out)


class ResidualAttentionBlock(nn.Module):
  """Pre-norm transformer block with a 4× QuickGELU MLP."""
  heads: int

  @nn.compact
  def __call__(self, x):
    d = x.shape[-1]
    x = x + MultiheadAttention(self.heads, name="attn")(
        nn.LayerNorm(epsilon=1e-5, name="ln_1")(x))
    y = nn.LayerNorm(epsilon=1e-5, name="ln_2")(x)
    y = nn.Dense(4 * d, name="c_fc")(y)
    y = nn.Dense(d, name="c_proj")(quick_gelu(y))
    return x + y


class VisualTransformer(nn.Module):
  """FaRL's ViT, returning the patch-token maps after `output_indices` blocks."""
  width: int
  layers: int
  heads: int
  patch_size: int
  output_indices: Sequence[int]

  @nn.compact
  def __call__(self, x):
    b = x.shape[0]
    x = nn.Conv(self.width, (self.patch_size,) * 2, strides=self.patch_size,
                padding="VALID", use_bias=False, name="conv1")(x)
    gh, gw = x.shape[1:3]
    x = x.reshape(b, gh * gw, self.width)
    cls = self.param("class_embedding", nn.initializers.zeros, (self.width,))
    pos = self.param("positional_embedding", nn.initializers.zeros,
                     (gh * gw + 1, self.width))
    x = jnp.concatenate([jnp.broadcast_to(cls, (b, 1, self.width)), x], 1)
    x = nn.LayerNorm(epsilon=1e-5, name="ln_pre")(x + pos)
    maps = []
    for i in range(max(self.output_indices) + 1):
      x = ResidualAttentionBlock(self.heads, name=f"resblocks_{i}")(x)
      if i in self.output_indices:
        maps.append(x[:, 1:].reshape(b, gh, gw, self.width))
    return maps


class ConvTranspose2x2(nn.Module):
  """2×2 transposed convolution with stride 2: every input pixel → a 2×2 block."""
  features: int

  @nn.compact
  def __call__(self, x):
    kernel = self.param("kernel", nn.initializers.lecun_normal(),
                        (2, 2, x.shape[-1], self.features))
    bias = self.param("bias", nn.initializers.zeros, (self.features,))
    b, h, w, _ = x.shape
    y = jnp.einsum("bhwc,ijco->bhiwjo", x, kernel)
    return y.reshape(b, 2 * h, 2 * w, self.features) + bias


class FPNs(nn.Module):
  """The four scale branches: ×4, ×2, ×1, ×½ of the 28² token maps."""
  width: int

  @nn.compact
  def __call__(self, maps):
    x0 = ConvTranspose2x2(self.width, name="fpn0_up1")(maps[0])
    x0 = nn.BatchNorm(use_running_average=True, epsilon=1e-5,
                      name="fpn0_bn")(x0)
    x0 = ConvTranspose2x2(self.width, name="fpn0_up2")(
        jax.nn.gelu(x0, approximate=False))
    x1 = ConvTranspose2x2(self.width, name="fpn1_up")(maps[1])
    x3 = nn.max_pool(maps[3], (2, 2), strides=(2, 2))
    return [x0, x1, maps[2], x3]


class FaRLFeatures(nn.Module):
  """FaRL-B/16 backbone with FPNs: 448² [0, 1] image → four pyramid features."""
  width: int
  layers: int
  heads: int
  patch_size: int
  output_indices: Sequence[int]

  @nn.compact
  def __call__(self, x):
    mean = self.param("image_mean", nn.initializers.zeros, (3,))
    std = self.param("image_std", nn.initializers.ones, (3,))
    x = (x - mean) / std
    maps = VisualTransformer(self.width, self.layers, self.heads,
                             self.patch_size, self.output_indices,
                             name="visual")(x)
    return FPNs(self.width, name="fpns")(maps)


# ---------------------------------------------------------------------- head

class ConvModule(nn.Module):
  """mmseg ConvModule: conv without bias → BatchNorm → ReLU."""
  features: int
  kernel: int

  @nn.compact
  def __call__(self, x):
    p = self.kernel // 2
    x = nn.Conv(self.features, (self.kernel,) * 2, padding=((p, p), (p, p)),
                use_bias=False, name="conv")(x)
    x = nn.BatchNorm(use_running_average=True, epsilon=1e-5, name="bn")(x)
    return jax.nn.relu(x)


class UPerHead(nn.Module):
  """mmseg UPerHead: pyramid pooling on the coarsest level, top-down FPN, fuse."""
  channels: int
  num_classes: int
  pool_scales: Sequence[int]

  @nn.compact
  def __call__(self, inputs):
    top = inputs[-1]
    psp = [top]
    for i, s in enumerate(self.pool_scales):
      y = ConvModule(self.channels, 1, name=f"psp_modules_{i}")(
          ops.adaptive_avg_pool(top, s))
      psp.append(ops.resize_bilinear_torch(y, top.shape[1:3]))
    laterals = [ConvModule(self.channels, 1, name=f"lateral_convs_{i}")(x)
                for i, x in enumerate(inputs[:-1])]
    laterals.append(ConvModule(self.channels, 3, name="bottleneck")(
        jnp.concatenate(psp, -1)))
    for i in range(len(laterals) - 1, 0, -1):
      laterals[i - 1] = laterals[i - 1] + ops.resize_bilinear_torch(
          laterals[i], laterals[i - 1].shape[1:3])
    outs = [ConvModule(self.channels, 3, name=f"fpn_convs_{i}")(x)
            for i, x in enumerate(laterals[:-1])]
    outs.append(laterals[-1])
    size = outs[0].shape[1:3]
    outs = [outs[0]] + [ops.resize_bilinear_torch(x, size) for x in outs[1:]]
    x = ConvModule(self.channels, 3, name="fpn_bottleneck")(
        jnp.concatenate(outs, -1))
    return nn.Conv(self.num_classes, (1, 1), name="conv_seg")(x)


class FaceParsingTransformer(nn.Module):
  """facer's parsing network: 448² NHWC image in [0, 1] → logits at out_size²."""
  width: int = 768
  layers: int = 12
  heads: int = 12
  patch_size: int = 16
  output_indices: Sequence[int] = (3, 5, 7, 11)
  channels: int = 768
  pool_scales: Sequence[int] = (1, 2, 3, 6)
  num_classes: int = 19
  out_size: int = 512

  @nn.compact
  def __call__(self, x, return_features=False):
    feats = FaRLFeatures(self.width, self.layers, self.heads, self.patch_size,
                         tuple(self.output_indices), name="backbone")(x)
    logits = UPerHead(self.channels, self.num_classes,
                      tuple(self.pool_scales), name="head")(feats)
    logits = ops.resize_bilinear_torch(logits, (self.out_size, self.out_size))
    if return_features:
      return logits, feats
    return logits


def network_from_config(config):
  """The FaceParsingTransformer a converted checkpoint's config describes."""
  return FaceParsingTransformer(
      width=config["width"], layers=config["layers"], heads=config["heads"],
      patch_size=config["patch_size"],
      output_indices=tuple(config["output_indices"]),
      channels=config["channels"], pool_scales=tuple(config["pool_scales"]),
      num_classes=config["num_classes"], out_size=config["out_size"])


# -------------------------------------------------------------------- parsing

def parse_logits(logits_fn, images, landmarks=None, *,
                 input_size=448, face_scale=alignment.CELEBM_FACE_SCALE):
  """Runs `logits_fn` on the aligned crops and returns logits in image space.

  images: (B, H, W, 3) in [-1, 1]; landmarks: (B, 5, 2) pixel-centre (x, y)
  or None for FFHQ/CelebA-HQ-aligned images (the canonical FFHQ landmarks).
  logits_fn: (B, S, S, 3) [0, 1] crop → (B, s, s, C) logits over the crop.
  Pixels that fall outside the crop get zero logits (as in facer).
  """
  b, h, w, _ = images.shape
  if landmarks is None:
    if h != w:
      raise ValueError(
          f"canonical FFHQ landmarks need square images, got {h}×{w}; "
          "pass landmarks=(B, 5, 2) for other images")
    landmarks = jnp.broadcast_to(alignment.ffhq_landmarks(h), (b, 5, 2))
  m = alignment.face_to_frame(landmarks, input_size, face_scale)
  crops = alignment.warp_to_frame((images + 1.0) / 2.0, m, input_size)
  return alignment.warp_from_frame(logits_fn(crops), m, (h, w), input_size)


@functools.partial(jax.jit, static_argnames=("config",))
def _logits(config, params, x):
  return network_from_config(config).apply(params, x)


@functools.partial(jax.jit, static_argnames=("config",))
def _parse(config, params, images, landmarks):
  network = network_from_config(config)
  logits = parse_logits(
      lambda x: network.apply(params, x), images, landmarks,
      input_size=config["input_size"], face_scale=config["face_scale"])
  return jax.nn.softmax(logits, axis=-1)


@struct.dataclass
class Parser:
  """A loaded FaRL parser, as a pytree: `params` (the Flax variable dict) is
  its leaves, `config` (read-only) its static part.

  parse(params, images, landmarks=None) → (B, H, W, C) class probabilities at
    the input resolution for NHWC images in [-1, 1] (aligned FFHQ-style when
    landmarks is None); channels follow `config['labels']`.
  logits(params, x448) → (B, 512, 512, C) raw logits of the network on a
    448² NHWC input in [0, 1].
  Both are compiled once per architecture (config) and input shapes.
  """
  params: Any
  config: dict = struct.field(pytree_node=False)

  def __post_init__(self):
    object.__setattr__(self, "config", freeze(self.config))

  @property
  def module(self):
    return network_from_config(self.config)

  def logits(self, params, x):
    """(B, 448, 448, 3) crops in [0, 1] → (B, 512, 512, C) logits."""
    return _logits(self.config, params, x)

  def parse(self, params, images, landmarks=None):
    """(B, H, W, 3) images in [-1, 1] → (B, H, W, C) class probabilities."""
    if landmarks is None:
      b, h, w = images.shape[:3]
      if h != w:
        raise ValueError(
            f"canonical FFHQ landmarks need square images, got {h}×{w}; "
            "pass landmarks=(B, 5, 2) for other images")
      # As an array, so canonical and given landmarks share one compilation.
      landmarks = np.broadcast_to(alignment.ffhq_landmarks(h), (b, 5, 2))
    return _parse(self.config, params, images,
                  jnp.asarray(landmarks, jnp.float32))

  @property
  def labels(self):
    return tuple(self.config["labels"])


def load(path):
  """Loads a converted FaRL parser (`python -m converters.farl`) from `path`.

  `path` is the converted directory or a bundle holding a `farl/` one.
  """
  tree, config = checkpoint.load(checkpoint.find(path, KIND), KIND)
  config = {**DEFAULT_CONFIG, **config}
  return Parser(params=tree, config=config)
