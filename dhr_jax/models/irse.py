"""The IR / IR-SE face-recognition trunk (ArcFace's ResNet variant), NHWC.

Shared by every network built on it: e4e's encoder (IR-SE50), HFGI's small
residual networks (plain IR units) and the CurricularFace identity network
(IR-101). The official code (TreB1eN's InsightFace_Pytorch `model_irse`, as
GANInverter and e4e ship it) builds the trunk from `get_blocks(num_layers)`;
`unit_specs` lists the same units.

Nothing here is trained, so BatchNorm is a frozen affine map of its running
statistics, which live in the same `params` tree as the weights.

The helpers `stem` and `body` are plain functions called from a parent's
compact `__call__`: their submodules (`input_conv`, `input_bn`,
`input_prelu`, `body_<i>`) are named in the parent's scope, so every network
keeps the flat parameter names its converter writes.
"""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

# (in_channels, depth, units) per stage of get_blocks(num_layers); each stage
# starts with a stride-2 unit.
STAGES = {
    50: ((64, 64, 3), (64, 128, 4), (128, 256, 14), (256, 512, 3)),
    100: ((64, 64, 3), (64, 128, 13), (128, 256, 30), (256, 512, 3)),
    152: ((64, 64, 3), (64, 128, 8), (128, 256, 36), (256, 512, 3)),
}


def unit_specs(num_layers):
  """[(in_channels, depth, stride)] of the trunk's bottleneck units."""
  if num_layers not in STAGES:
    raise ValueError(f"num_layers must be one of {sorted(STAGES)}, got "
                     f"{num_layers}")
  specs = []
  for c_in, depth, units in STAGES[num_layers]:
    specs.append((c_in, depth, 2))
    specs += [(depth, depth, 1)] * (units - 1)
  return specs


def pad1():
  # PyTorch padding=1; "SAME" would pad (0, 1) for stride 2 and shift the grid.
  return ((1, 1), (1, 1))


class FrozenBatchNorm(nn.Module):
  """BatchNorm in eval mode: running statistics are parameters.

  affine=False: BatchNorm1d(affine=False), statistics only (IR-101's last
  layer).
  """
  eps: float = 1e-5
  affine: bool = True

  @nn.compact
  def __call__(self, x):
    c = x.shape[-1]
    mean = self.param("mean", nn.initializers.zeros, (c,))
    var = self.param("var", nn.initializers.ones, (c,))
    if not self.affine:
      return (x - mean) * jax.lax.rsqrt(var + self.eps)
    scale = self.param("scale", nn.initializers.ones, (c,))
    bias = self.param("bias", nn.initializers.zeros, (c,))
    return (x - mean) * (scale * jax.lax.rsqrt(var + self.eps)) + bias


class PReLU(nn.Module):
  """Leaky ReLU with one learned negative slope per channel."""

  @nn.compact
  def __call__(self, x):
    alpha = self.param("alpha", nn.initializers.constant(0.25), (x.shape[-1],))
    return jnp.where(x >= 0, x, alpha * x)


class SqueezeExcite(nn.Module):
  """Channel gating from globally pooled features (reduction 16)."""
  reduction: int = 16

  @nn.compact
  def __call__(self, x):
    c = x.shape[-1]
    s = jnp.mean(x, axis=(1, 2))
    s = nn.relu(nn.Dense(c // self.reduction, use_bias=False, name="fc1")(s))
    s = nn.sigmoid(nn.Dense(c, use_bias=False, name="fc2")(s))
    return x * s[:, None, None, :]


class BottleneckIRSE(nn.Module):
  """bottleneck_IR_SE: BN-conv-PReLU-conv(stride)-BN-SE plus a shortcut;
  with se=False the plain bottleneck_IR."""
  in_channels: int
  depth: int
  stride: int
  se: bool = True

  @nn.compact
  def __call__(self, x):
    s = self.stride
    if self.in_channels == self.depth:
      # MaxPool2d(kernel 1, stride s) is plain subsampling.
      shortcut = x[:, ::s, ::s, :]
    else:
      shortcut = nn.Conv(self.depth, (1, 1), (s, s), padding="VALID",
                         use_bias=False, name="shortcut_conv")(x)
      shortcut = FrozenBatchNorm(name="shortcut_bn")(shortcut)
    r = FrozenBatchNorm(name="bn1")(x)
    r = nn.Conv(self.depth, (3, 3), padding=pad1(), use_bias=False,
                name="conv1")(r)
    r = PReLU(name="prelu")(r)
    r = nn.Conv(self.depth, (3, 3), (s, s), padding=pad1(), use_bias=False,
                name="conv2")(r)
    r = FrozenBatchNorm(name="bn2")(r)
    if self.se:
      r = SqueezeExcite(name="se")(r)
    return r + shortcut


def stem(x, features=64):
  """input_layer: 3×3 conv (no bias), BatchNorm, PReLU (call inside a
  compact method)."""
  x = nn.Conv(features, (3, 3), padding=pad1(), use_bias=False,
              name="input_conv")(x)
  x = FrozenBatchNorm(name="input_bn")(x)
  return PReLU(name="input_prelu")(x)


def body(x, num_layers, se):
  """The trunk's units `body_<i>` (call inside a compact method).

  Returns the output of every unit, in order (the encoders read
  intermediate ones).
  """
  feats = []
  for i, (c_in, depth, stride) in enumerate(unit_specs(num_layers)):
    x = BottleneckIRSE(c_in, depth, stride, se=se, name=f"body_{i}")(x)
    feats.append(x)
  return feats


def random_params(shapes, seed, is_head, head_scale=1.0):
  """Seeded stand-in weights (the compare demo's encoders and HFGI) for a
  params tree of shapes: numpy `RandomState(seed)`, the same on every
  machine; kernels normal with variance 1/fan_in, those whose path
  `is_head(path)` says end a head (their outputs are code offsets or
  scale/shift) times head_scale; biases 0, BatchNorm the identity, PReLU
  0.25."""
  rng = np.random.RandomState(seed)
  fill = {"bias": 0.0, "mean": 0.0, "var": 1.0, "scale": 1.0, "alpha": 0.25}

  def leaf(path, a):
    name = path[-1].key
    if name != "kernel":
      return np.full(a.shape, fill[name], np.float32)
    w = rng.standard_normal(a.shape).astype(np.float32)
    w /= np.sqrt(np.prod(a.shape[:-1]))
    if is_head(path):
      w *= head_scale
    return w
  return jax.tree_util.tree_map_with_path(leaf, shapes)
