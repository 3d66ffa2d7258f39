"""Encoder4Editing (e4e) with the IR-SE50 backbone, NHWC, inference only.

Architecture of Tov et al., "Designing an Encoder for StyleGAN Image
Manipulation" (2021): an IR-SE50 face-recognition trunk, two FPN laterals and
one GradualStyleBlock per style vector. The first block predicts a single w0
that is repeated over all styles; every other block predicts a delta added to
its own copy (the editability constraint of e4e). The coarse styles (0-2) read
the 16² trunk output, the middle ones (3-6) the 32² FPN level and the fine ones
the 64² level.

The trunk is `dhr_jax.models.irse`'s (shared with HFGI and the identity
network): BatchNorm is a frozen affine map of its running statistics, which
live in the same `params` tree as the weights (one pytree in, W+ codes out).
"""
import functools
import math
from typing import Any

import flax.linen as nn
from flax import struct
import jax
import jax.numpy as jnp

from dhr_jax import checkpoint
from dhr_jax.models import irse
from dhr_jax.models import ops
from dhr_jax.models.frozen import freeze

INPUT_SIZE = 256  # e4e is trained on 256² crops; its style heads assume it.
STYLE_DIM = 512
COARSE_END = 3    # styles [0, 3) from the 16² map
MIDDLE_END = 7    # styles [3, 7) from 32², the rest from 64²

NUM_LAYERS = 50  # IR-SE50


def style_count(size):
  """Number of W+ styles of a StyleGAN2 generator of resolution `size`."""
  log_size = int(math.log2(size))
  if 2 ** log_size != size or size < 8:
    raise ValueError(f"generator size must be a power of two >= 8, got {size}")
  return 2 * log_size - 2


def style_block_convs(i, input_size=INPUT_SIZE):
  """Number of stride-2 convolutions of GradualStyleBlock i (down to 1²);
  the trunk's maps are input_size/16, /8 and /4 (16², 32², 64² at 256²)."""
  spatial = 16 if i < COARSE_END else 32 if i < MIDDLE_END else 64
  return int(math.log2(spatial * input_size // INPUT_SIZE))


class GradualStyleBlock(nn.Module):
  """Stride-2 convs down to 1², then a linear layer: one style vector."""
  num_convs: int
  features: int = STYLE_DIM

  @nn.compact
  def __call__(self, x):
    for j in range(self.num_convs):
      x = nn.Conv(self.features, (3, 3), (2, 2), padding=irse.pad1(),
                  name=f"conv_{j}")(x)
      x = nn.leaky_relu(x, 0.01)  # torch.nn.LeakyReLU() default slope
    if x.shape[1:3] != (1, 1):
      raise ValueError(
          f"GradualStyleBlock ended at {x.shape[1:3]}, not 1x1: the encoder "
          f"expects {INPUT_SIZE}² inputs (use Encoder.encode, which resizes).")
    return nn.Dense(self.features, name="linear")(x[:, 0, 0, :])


def upsample_bilinear_aligned(x, size):
  """F.interpolate(x, size, mode='bilinear', align_corners=True), NHWC."""
  return ops.resize_bilinear_torch(x, size, align_corners=True)


class Encoder4Editing(nn.Module):
  """IR-SE50 e4e: (B, 256, 256, 3) in [-1, 1] → raw W+ codes (B, n, 512).

  The raw codes are offsets from the generator's average latent; the caller
  adds `latent_avg` (see `Encoder.encode`).
  """
  n_styles: int
  # The released encoders' (converted checkpoints); other values only for
  # stand-ins of small generators (`dhr_jax.synthetic`).
  style_dim: int = STYLE_DIM
  input_size: int = INPUT_SIZE

  @nn.compact
  def __call__(self, x):
    feats = irse.body(irse.stem(x), NUM_LAYERS, se=True)
    c1, c2, c3 = feats[6], feats[20], feats[23]  # 64², 32², 16²

    p2 = upsample_bilinear_aligned(c3, c2.shape[1:3]) + nn.Conv(
        STYLE_DIM, (1, 1), name="latlayer1")(c2)
    p1 = upsample_bilinear_aligned(p2, c1.shape[1:3]) + nn.Conv(
        STYLE_DIM, (1, 1), name="latlayer2")(c1)
    block = lambda i: GradualStyleBlock(
        style_block_convs(i, self.input_size), self.style_dim,
        name=f"styles_{i}")

    w0 = block(0)(c3)
    codes = [w0]
    for i in range(1, self.n_styles):
      features = c3 if i < COARSE_END else p2 if i < MIDDLE_END else p1
      delta = block(i)(features)
      codes.append(w0 + delta)
    return jnp.stack(codes, axis=1)


def resize_for_encoder(images, size=INPUT_SIZE):
  """Resizes NHWC images to size² like PIL's bilinear `Image.resize`.

  The official e4e transforms resize the PIL image to 256² (bilinear) before
  ToTensor/Normalize. PIL's bilinear filter widens its triangle kernel by the
  downscale factor (area-aware), which is what jax.image.resize does with
  antialias=True; a plain 4-tap bilinear would alias 1024² → 256² badly and
  give the encoder a different input than it was trained with. Normalising
  before or after the resize is the same, as the filter weights sum to one.
  """
  b, h, w, c = images.shape
  if (h, w) == (size, size):
    return images
  return jax.image.resize(images, (b, size, size, c), method="linear",
                          antialias=True)


def build_model(config):
  """The Flax module of a converted encoder's config: e4e, or (config
  'arch') pSp / ReStyle from `dhr_jax.models.encoders`."""
  arch = config.get("arch", "e4e")  # e4e checkpoints predate 'arch'
  if arch == "e4e":
    return Encoder4Editing(n_styles=config["n_latent"],
                           style_dim=config["style_dim"],
                           input_size=config["input_size"])
  from dhr_jax.models import encoders  # builds on this module
  return encoders.build_model(config)


@functools.partial(jax.jit, static_argnames=("config",))
def _encode(config, params, images, latent_avg):
  model = build_model(config)
  codes = model.apply({"params": params},
                      resize_for_encoder(images, config["input_size"]))
  if latent_avg is not None:
    codes = codes + latent_avg
  return codes


@struct.dataclass
class Encoder:
  """A loaded encoder (e4e; pSp and ReStyle by config 'arch'), as a pytree (params and latent_avg are leaves,
  the config static), so it can be passed to jitted functions.

  Attributes:
    params: pytree of the Flax module's parameters (BatchNorm statistics
      included).
    config: read-only dict with size (generator resolution), n_latent,
      style_dim, input_size, num_layers, mode; pSp / ReStyle checkpoints
      add arch ('psp' | 'restyle') and input_nc (ReStyle: 6).
    latent_avg: (n_latent, style_dim) average latent the raw codes are
      offsets from.
  """
  params: Any
  config: dict = struct.field(pytree_node=False)
  latent_avg: Any

  def __post_init__(self):
    object.__setattr__(self, "config", freeze(self.config))

  @property
  def module(self):
    """The Flax module of this config (e4e, pSp or ReStyle)."""
    return build_model(self.config)

  def encode(self, params, images, add_latent_avg=True):
    """W+ codes (B, n_latent, style_dim) of NHWC images in [-1, 1].

    Images of any size are resized to 256² first (see `resize_for_encoder`).
    With add_latent_avg (the default, as e4e was trained with
    start_from_latent_avg) the codes are ready for the generator; without it
    the raw encoder output is returned.
    """
    images = jnp.asarray(images)
    c = self.config.get("input_nc", 3)
    if images.ndim != 4 or images.shape[-1] != c:
      what = "RGB images" if c == 3 else f"{c}-channel inputs"
      raise ValueError(
          f"encode expects NHWC {what} (B, H, W, {c}), got {images.shape}")
    avg = jnp.asarray(self.latent_avg) if add_latent_avg else None
    return _encode(self.config, params, images, avg)


def make_config(size):
  return {"size": int(size), "n_latent": style_count(size),
          "style_dim": STYLE_DIM, "input_size": INPUT_SIZE, "num_layers": 50,
          "mode": "ir_se"}


def param_shapes(size):
  """Shapes of the Flax parameter tree for a generator of `size`, no compute."""
  model = Encoder4Editing(n_styles=style_count(size))
  x = jax.ShapeDtypeStruct((1, INPUT_SIZE, INPUT_SIZE, 3), jnp.float32)
  return jax.eval_shape(model.init, jax.random.PRNGKey(0), x)["params"]


def load(path):
  """Loads a converted e4e encoder (a directory, or a bundle holding e4e/).

  Convert the released PyTorch file first:
  `python -m converters.e4e --src e4e_ffhq_encode.pt --dst DIR`.
  """
  directory = checkpoint.find(path, "e4e")
  tree, config = checkpoint.load(directory, "e4e")
  if set(tree) != {"params", "latent_avg"}:
    raise checkpoint.CheckpointError(
        f"{directory} is not an e4e checkpoint written by converters.e4e "
        f"(top-level entries {sorted(tree)}); re-run the converter.")
  n = config["n_latent"]
  if tuple(tree["latent_avg"].shape) != (n, config["style_dim"]):
    raise checkpoint.CheckpointError(
        f"{directory}: latent_avg has shape {tuple(tree['latent_avg'].shape)}, "
        f"config says ({n}, {config['style_dim']}); re-run the converter.")
  return Encoder(params=tree["params"], config=config,
                 latent_avg=tree["latent_avg"])
