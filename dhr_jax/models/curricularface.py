"""The paper's identity network: CurricularFace's IR-101, NHWC, inference only.

GANInverter's `scripts/calc_id_loss.py` (the ID column of DHR's tables)
embeds MTCNN-aligned 112² face crops with `IR_101(input_size=112)` —
`Backbone(112, 100, 'ir', drop_ratio=0.4, affine=False)` loaded from
`CurricularFace_Backbone.pth` — in eval mode, and scores identity as the dot
product of the l2-normalised 512-d embeddings. The trunk is
`dhr_jax.models.irse`'s (plain IR units, 49 of them); the output layer is
BatchNorm2d, Dropout (identity in eval mode), flatten, Linear(512·7·7, 512)
and BatchNorm1d without affine parameters.

Convert the released file with
`python -m converters.curricularface --src CurricularFace_Backbone.pth --dst DIR`
and load it with `dhr_jax.load_id_network(DIR)`; `dhr_jax.alignment.
identity_crops` makes the 112² crops.
"""
import functools
from typing import Any

import flax.linen as nn
from flax import struct
import jax
import jax.numpy as jnp

from dhr_jax import checkpoint
from dhr_jax.models import irse
from dhr_jax.models.frozen import freeze

KIND = "curricularface"
INPUT_SIZE = 112
NUM_LAYERS = 100   # IR_101 is Backbone(num_layers=100)
EMBEDDING_DIM = 512
OUTPUT_SPATIAL = 7  # 112 / 2⁴ after the four stride-2 stages


class IR101(nn.Module):
  """(B, 112, 112, 3) in [-1, 1] → l2-normalised embeddings (B, 512)."""
  num_layers: int = NUM_LAYERS

  @nn.compact
  def __call__(self, x):
    x = irse.body(irse.stem(x), self.num_layers, se=False)[-1]
    x = irse.FrozenBatchNorm(name="output_bn")(x)
    # torch's Flatten of an NCHW map is channel-major; the Linear's weight
    # columns follow that order.
    x = jnp.transpose(x, (0, 3, 1, 2)).reshape(x.shape[0], -1)
    x = nn.Dense(EMBEDDING_DIM, name="output_linear")(x)
    x = irse.FrozenBatchNorm(affine=False, name="output_bn1d")(x)
    # l2_norm divides by the norm without an epsilon.
    return x / jnp.linalg.norm(x, axis=-1, keepdims=True)


@functools.partial(jax.jit, static_argnames=("config",))
def _embed(config, params, crops):
  return IR101(num_layers=config["num_layers"]).apply({"params": params},
                                                      crops)


def make_config():
  return {"num_layers": NUM_LAYERS, "mode": "ir", "input_size": INPUT_SIZE,
          "embedding_dim": EMBEDDING_DIM}


@struct.dataclass
class IDNetwork:
  """A loaded identity network, as a pytree (params are leaves, the config
  static), so it can be passed to jitted functions.

  Attributes:
    params: pytree of the Flax module's parameters (BatchNorm statistics
      included).
    config: read-only dict with num_layers, mode, input_size,
      embedding_dim.
  """
  params: Any
  config: dict = struct.field(pytree_node=False)

  def __post_init__(self):
    object.__setattr__(self, "config", freeze(self.config))

  @property
  def module(self):
    return IR101(num_layers=self.config["num_layers"])

  def embed(self, params, crops):
    """l2-normalised embeddings (B, 512) of aligned face crops
    (B, 112, 112, 3) in [-1, 1] (`alignment.identity_crops`, then
    `crops / 127.5 - 1`, as ToTensor and Normalize(0.5, 0.5) give)."""
    crops = jnp.asarray(crops, jnp.float32)
    size = self.config["input_size"]
    if crops.ndim != 4 or crops.shape[1:] != (size, size, 3):
      raise ValueError(f"embed expects aligned crops (B, {size}, {size}, 3), "
                       f"got {crops.shape}")
    return _embed(self.config, params, crops)


def param_shapes():
  """Shapes of the Flax parameter tree, no compute."""
  x = jax.ShapeDtypeStruct((1, INPUT_SIZE, INPUT_SIZE, 3), jnp.float32)
  return jax.eval_shape(IR101().init, jax.random.PRNGKey(0), x)["params"]


def load(path):
  """Loads a converted CurricularFace IR-101 (a directory, or a bundle
  holding curricularface/).

  Convert the released PyTorch file first: `python -m
  converters.curricularface --src CurricularFace_Backbone.pth --dst DIR`.
  """
  directory = checkpoint.find(path, KIND)
  tree, config = checkpoint.load(directory, KIND)
  if set(tree) != {"params"} or config != make_config():
    raise checkpoint.CheckpointError(
        f"{directory} is not an IR-101 written by converters.curricularface "
        f"(entries {sorted(tree)}, config {config}); re-run the converter.")
  return IDNetwork(params=tree["params"], config=config)
