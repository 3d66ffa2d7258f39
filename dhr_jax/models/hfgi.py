"""HFGI: high-fidelity GAN inversion by distortion consultation (Wang et al.,
"High-Fidelity GAN Inversion for Image Attribute Editing", CVPR 2022).

Two small networks refine an e4e inversion without optimisation:

  * the ADA aligner (`grid_align` in the released checkpoint): an IR-bottleneck
    U-Net at 256² that takes concat(residual, embedded image) and returns the
    residual aligned to that image (for edits: to the edited image);
  * the consultation encoder (`residue`): IR bottlenecks down to 64², then two
    EqualConv–ScaledLeakyReLU–EqualConv heads giving `scale` and `shift`
    (512 channels, 64²).

The generator applies them through its feature hook: the 64² feature entering
the conv of latent 8 becomes f·(1 + scale) + shift (`feature_modulation`;
the official code does it right after the first conv of latent 7).

The sizes are the model's config (`HFGIConfig`): the released checkpoint's
are `OFFICIAL`; `config_for` gives the same architecture for a smaller
generator (the compare demo's stand-in, `synthetic.stand_in_hfgi`).

Both networks are inference-only, so BatchNorm is a frozen affine map whose
statistics live in `params` (as in `dhr_jax.models.e4e`), and the
equalised-lr scale of the heads is folded into their kernels by the
converter.
"""
import dataclasses
from typing import Any

import flax.linen as nn
from flax import struct
import jax
import jax.numpy as jnp

from dhr_jax import checkpoint
from dhr_jax.models import irse
from dhr_jax.models import ops
from dhr_jax.models.stylegan2 import feature_modulation, feature_resolution

KIND = "hfgi"
# The released checkpoint's architecture (`OFFICIAL`, for a 1024²
# generator); `HFGIConfig` carries the sizes, so a stand-in for a smaller
# generator (`config_for`) is the same code.
INPUT_SIZE = 256          # both networks run on 256² residuals
FEATURE_IDX = 8           # the hooked feature: 64², entering latent 8's conv
CONDITION_CHANNELS = 512  # scale/shift channels (the generator's at 64²)

# (first in_channels, depth) of the stride-2 stages; each stage is one
# stride-2 bottleneck and two stride-1 ones.
ALIGN_STEM, ALIGN_DOWN = 16, ((16, 32), (32, 48), (48, 64))
# The aligner's decoder stages (stride 1): (in_channels, depth) per unit.
ALIGN_UP = (((112, 64), (64, 32), (32, 32)),
            ((64, 32), (32, 16), (16, 16)),
            ((32, 16), (16, 3), (3, 3)))
RESIDUE_STEM, RESIDUE_DOWN = 32, ((32, 48), (48, 64))
HEADS = ("condition_scale3", "condition_shift3")


def unit_specs(net, residue_down=None):
  """[(official prefix, in_channels, depth, stride)] of every bottleneck of
  'grid_align' or 'residue', in the order the network runs them.
  residue_down: the consultation encoder's stages (`HFGIConfig.
  residue_down`), which 'residue' needs; the aligner's are fixed."""
  if net == "residue" and residue_down is None:
    raise ValueError("unit_specs('residue') needs HFGIConfig.residue_down")
  down = {"grid_align": ALIGN_DOWN, "residue": residue_down}[net]
  specs = []
  for i, (c_in, depth) in enumerate(down):
    specs.append((f"conv_layer{i + 2}.0", c_in, depth, 2))
    specs += [(f"conv_layer{i + 2}.{j}", depth, depth, 1) for j in (1, 2)]
  if net == "grid_align":
    for i, stage in enumerate(ALIGN_UP):
      specs += [(f"dconv_layer{i + 1}.{j}", c_in, depth, 1)
                for j, (c_in, depth) in enumerate(stage)]
  return specs


def module_name(prefix):
  """Official 'conv_layer2.0' → Flax submodule name 'conv_layer2_0'."""
  return prefix.replace(".", "_")


def _stage(x, net, stage, residue_down=None):
  """The bottlenecks of one official Sequential (e.g. 'dconv_layer2')."""
  for prefix, c_in, depth, stride in unit_specs(net, residue_down):
    if prefix.split(".")[0] == stage:
      x = irse.BottleneckIRSE(c_in, depth, stride, se=False,
                         name=module_name(prefix))(x)
  return x


def _upsample_to(x, like):
  # F.interpolate(mode='bilinear') with its default align_corners=False.
  return ops.resize_bilinear_torch(x, like.shape[1:3])


class ResidualAligner(nn.Module):
  """ADA: concat(residual, image) (B, 256, 256, 6) → aligned residual
  (B, 256, 256, 3) (any size divisible by 8: `HFGIConfig.input_size`)."""

  @nn.compact
  def __call__(self, x):
    f1 = irse.stem(x, ALIGN_STEM)
    f2 = _stage(f1, "grid_align", "conv_layer2")
    f3 = _stage(f2, "grid_align", "conv_layer3")
    f4 = _stage(f3, "grid_align", "conv_layer4")
    d1 = _stage(jnp.concatenate([_upsample_to(f4, f3), f3], -1),
                "grid_align", "dconv_layer1")
    d2 = _stage(jnp.concatenate([_upsample_to(d1, f2), f2], -1),
                "grid_align", "dconv_layer2")
    return _stage(jnp.concatenate([_upsample_to(d2, f1), f1], -1),
                  "grid_align", "dconv_layer3")


class ConditionHead(nn.Module):
  """EqualConv2d → ScaledLeakyReLU(0.2) → EqualConv2d (3×3, bias); the
  equalised-lr scale is already folded into the kernels."""
  features: int

  @nn.compact
  def __call__(self, x):
    x = nn.Conv(self.features, (3, 3), padding=irse.pad1(),
                name="conv_0")(x)
    # ScaledLeakyReLU is leaky_relu(x, 0.2)·√2: fused_leaky_relu, no bias.
    x = ops.fused_leaky_relu(x, 0.0)
    return nn.Conv(self.features, (3, 3), padding=irse.pad1(),
                   name="conv_1")(x)


class ResidualEncoder(nn.Module):
  """Consultation encoder: aligned residual (B, 256, 256, 3) → (scale,
  shift), each (B, size, size, channels) with size, channels = the
  config's `condition_size`, `condition_channels` (64², 512 officially)."""
  config: "HFGIConfig"

  @nn.compact
  def __call__(self, x):
    c = self.config
    f = irse.stem(x, RESIDUE_STEM)
    for i in range(len(c.residue_down)):
      f = _stage(f, "residue", f"conv_layer{i + 2}", c.residue_down)
    size = (c.condition_size,) * 2
    scale = ConditionHead(c.condition_channels, name=HEADS[0])(f)
    shift = ConditionHead(c.condition_channels, name=HEADS[1])(f)
    # The official resize to 64² is the identity for 256² inputs (and
    # here for every config: the stages reach condition_size).
    return (ops.resize_bilinear_torch(scale, size),
            ops.resize_bilinear_torch(shift, size))


@dataclasses.dataclass(frozen=True)
class HFGIConfig:
  """The HFGI architecture (`OFFICIAL`, or `config_for` a smaller
  generator); hashable, so it is static under jit. Every field is given:
  the hooked layer is never a default.

  input_size: both networks' side; feature_idx: the generator's hooked
  feature (`dhr_jax.models.stylegan2` numbering); condition_channels: its
  channels, those of scale and shift.
  """
  input_size: int
  feature_idx: int
  condition_channels: int

  def __post_init__(self):
    ratio = self.input_size // self.condition_size
    if (ratio * self.condition_size != self.input_size
        or ratio & (ratio - 1) or self.input_size % 8):
      raise ValueError(
          f"HFGI input_size {self.input_size} must be a multiple of 8 and "
          f"a power-of-two multiple of the hooked feature's side "
          f"{self.condition_size} (feature_idx {self.feature_idx})")

  @property
  def condition_size(self):
    return feature_resolution(self.feature_idx)

  @property
  def residue_down(self):
    """The consultation encoder's stride-2 stages (in_channels, depth):
    as many as take input_size to condition_size, the official's two
    (256² → 64²) first, any further one at their last depth."""
    n = (self.input_size // self.condition_size).bit_length() - 1
    last = RESIDUE_DOWN[-1][1]
    return (RESIDUE_DOWN + ((last, last),) * n)[:n]


OFFICIAL = HFGIConfig(input_size=INPUT_SIZE, feature_idx=FEATURE_IDX,
                      condition_channels=CONDITION_CHANNELS)


def hooked_feature_idx(size):
  """The hook of HFGI for a generator of `size`, as the official's (k = 8:
  the 64² feature of a 1024² generator right after the first convolution
  at 64²): the size/16 feature (4² at least) right after the first
  convolution at its resolution. That is k = 2·log2(side/4) from 8² up;
  at 4², whose first convolution reads the constant input (k = 0), its
  output k = 1."""
  side = max(4, size // 16)
  return max(1, 2 * (side.bit_length() - 3))


def config_for(size, channels):
  """The HFGI architecture for a generator of `size` whose features have
  `channels` ({str(side): channels}, its config's): the official hook's
  analogue (`hooked_feature_idx`), both networks at min(size, 256)² as the
  stand-in encoders. config_for(1024, …) is `OFFICIAL`."""
  k = hooked_feature_idx(size)
  return HFGIConfig(input_size=min(size, INPUT_SIZE), feature_idx=k,
                    condition_channels=int(
                        channels[str(feature_resolution(k))]))


@struct.dataclass
class HFGI:
  """HFGI's aligner and consultation encoder as one pytree.

  params: {'align': ResidualAligner params, 'residue': ResidualEncoder
  params} (leaves); config: `HFGIConfig` (static). The methods take params
  explicitly, as the generator's (`H.consult(H.params, r)`), so the weights
  are traced arguments under jit and grad; `jax.jit(f)(H, x)` compiles once
  per architecture and reuses the program for other weights.
  """
  params: Any
  config: HFGIConfig = struct.field(pytree_node=False)

  def align(self, params, x):
    """concat(residual, image) (B, S, S, 6), S = config.input_size (256 for
    the released checkpoint) → aligned residual."""
    return ResidualAligner().apply({"params": params["align"]}, x)

  def consult(self, params, residual):
    """Aligned residual (B, S, S, 3), S = config.input_size → (scale,
    shift) at the hooked feature's resolution."""
    model = ResidualEncoder(self.config)
    return model.apply({"params": params["residue"]}, residual)


def param_shapes(config):
  """Shapes of HFGI's Flax parameter tree for `config`, without computing
  anything."""
  s = config.input_size
  x = lambda c: jax.ShapeDtypeStruct((1, s, s, c), jnp.float32)
  key = jax.random.PRNGKey(0)
  return {
      "align": jax.eval_shape(ResidualAligner().init, key, x(6))["params"],
      "residue": jax.eval_shape(ResidualEncoder(config).init, key,
                                x(3))["params"],
  }


def init_hfgi(seed, config, head_scale=1.0):
  """A stand-in HFGI of `config` with seeded random weights (the compare
  demo's, no weights), drawn as a stand-in encoder's
  (`irse.random_params`), the condition heads' last kernels times
  head_scale."""
  head = lambda path: path[-3].key in HEADS and path[-2].key == "conv_1"
  params = irse.random_params(param_shapes(config), seed, head, head_scale)
  return HFGI(params=params, config=config)


@jax.jit
def _forward(G, H, codes, images, edited_codes):
  # G and H are pytrees: one program per (architectures, shapes).
  params, noise = G.params, G.noise
  size = H.config.input_size
  embedded = G.synthesis(params, codes, noise)
  guide = ops.resize_generated(embedded, (size, size))
  res = images - guide
  if edited_codes is not None:
    # ADA: the inversion's residual, aligned to the edited image.
    codes = edited_codes
    guide = ops.resize_generated(G.synthesis(params, codes, noise),
                                 (size, size))
  res_aligned = H.align(H.params, jnp.concatenate([res, guide], axis=-1))
  scale, shift = H.consult(H.params, res_aligned)
  image = G.synthesis(params, codes, noise, feature_idx=H.config.feature_idx,
                      feature_fn=feature_modulation(scale, shift))
  return {"image": image, "embedded": embedded, "res": res,
          "res_aligned": res_aligned, "scale": scale, "shift": shift}


def _check(G, H, codes, images, edited_codes):
  c = H.config
  n, d = G.config["n_latent"], G.config["style_dim"]
  if codes.ndim != 3 or codes.shape[1:] != (n, d):
    raise ValueError(f"codes must be W+ (B, {n}, {d}) for this generator "
                     f"(latent_avg included), got {codes.shape}")
  b = codes.shape[0]
  want = (b, c.input_size, c.input_size, 3)
  if images.shape != want:
    raise ValueError(f"images must be {want}: NHWC in [-1, 1] at HFGI's "
                     f"{c.input_size}², one per code; got {images.shape}")
  if edited_codes is not None and edited_codes.shape != codes.shape:
    raise ValueError(f"edited_codes must have the shape of codes "
                     f"{codes.shape}, got {edited_codes.shape}")
  if G.config["num_layers"] <= c.feature_idx:
    raise ValueError(f"HFGI modulates the {c.condition_size}² feature; a "
                     f"{G.config['size']}² generator has none")
  channels = G.config["channels"][str(c.condition_size)]
  if channels != c.condition_channels:
    raise ValueError(f"HFGI's conditions have {c.condition_channels} "
                     f"channels but this generator's {c.condition_size}² "
                     f"features have {channels}")


def hfgi_forward(G, H, codes, images, edited_codes=None, noise=None):
  """The whole HFGI pass with its intermediates.

  Returns a dict: image (B, size, size, 3), embedded (the plain G(codes)),
  res and res_aligned (B, 256, 256, 3), scale and shift (B, 64, 64, 512)
  (officially; generally H.config's input_size, condition_size and
  condition_channels).
  See `hfgi_invert` for the arguments.
  """
  codes = jnp.asarray(codes, jnp.float32)
  images = jnp.asarray(images, jnp.float32)
  if edited_codes is not None:
    edited_codes = jnp.asarray(edited_codes, jnp.float32)
  _check(G, H, codes, images, edited_codes)
  if noise is not None:
    G = G.replace(noise=list(noise))
  return _forward(G, H, codes, images, edited_codes)


def hfgi_invert(G, H, codes, images, edited_codes=None, noise=None):
  """HFGI's refined inversion (or ADA edit) → (B, size, size, 3).

  G: the generator HFGI was trained with (`dhr_jax.load_generator`); H:
  `dhr_jax.load_hfgi`.
  codes: (B, n_latent, style_dim) W+ codes of the e4e inversion, latent_avg
  included; images: the inverted images (B, 256, 256, 3) in [−1, 1], NHWC
  (at H.config.input_size: 256 for the released checkpoint).
  With `edited_codes` (same shape) the image of those codes is returned,
  with conditions from the inversion's residual aligned to G(edited_codes).
  noise: the generator's fixed noise by default (randomize_noise=False).
  """
  return hfgi_forward(G, H, codes, images, edited_codes, noise)["image"]


def load(path):
  """Loads the HFGI networks written by `python -m converters.hfgi` (the
  bundle DIR, or DIR/hfgi)."""
  directory = checkpoint.find(path, KIND)
  tree, config = checkpoint.load(directory, KIND)
  if set(tree) != {"align", "residue"}:
    raise checkpoint.CheckpointError(
        f"{directory} is not an HFGI checkpoint written by converters.hfgi "
        f"(top-level entries {sorted(tree)}); re-run the converter.")
  try:
    config = HFGIConfig(**config)
  except (TypeError, ValueError) as e:
    raise checkpoint.CheckpointError(
        f"{directory}/config.json: unknown HFGI config ({e}); re-run the "
        "converter.") from None
  return HFGI(params=tree, config=config)
