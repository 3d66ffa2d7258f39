"""pSp and ReStyle beside e4e: the paper's other encoders, NHWC, inference.

Both are IR-SE50 encoders of the pSp family and share e4e's trunk
(`dhr_jax.models.irse`), style blocks and loaded form (`e4e.Encoder`, whose
config 'arch' picks the module):

- pSp (Richardson et al. 2021, GradualStyleEncoder): one GradualStyleBlock
  per style, independent of the others; coarse styles (0-2) from the 16²
  trunk output, middle (3-6) from the 32² FPN level, fine from the 64² one.
  `E.encode(E.params, x)` adds latent_avg (released pSp bundles start from
  the latent average).
- ReStyle (Alaluf et al. 2021, ProgressiveBackboneEncoder, its e4e variant):
  the image and the current reconstruction (6 channels) in, every style from
  the 16² trunk output; style 0 predicts w0 for all styles and every other
  block a delta on its own copy (as e4e). Used iteratively by
  `restyle_invert`: codes ← codes + E(cat(x, pool256(G(codes)))).
"""
import functools
import os

import flax.linen as nn
import jax
import jax.numpy as jnp

from dhr_jax import checkpoint
from dhr_jax.models import e4e, irse, ops

ARCHS = ("e4e", "psp", "restyle")
TITLES = {"e4e": "e4e (Encoder4Editing)", "psp": "pSp (GradualStyleEncoder)",
          "restyle": "ReStyle (ProgressiveBackboneEncoder)"}
RESTYLE_INPUT_NC = 6  # the image and the previous reconstruction


class GradualStyleEncoder(nn.Module):
  """pSp: (B, 256, 256, C) → raw W+ codes (B, n, 512), offsets from
  latent_avg."""
  n_styles: int
  style_dim: int = e4e.STYLE_DIM  # as e4e.Encoder4Editing's
  input_size: int = e4e.INPUT_SIZE

  @nn.compact
  def __call__(self, x):
    feats = irse.body(irse.stem(x), e4e.NUM_LAYERS, se=True)
    c1, c2, c3 = feats[6], feats[20], feats[23]  # 64², 32², 16²
    # _upsample_add: bilinear with align_corners=True, as in e4e.
    p2 = e4e.upsample_bilinear_aligned(c3, c2.shape[1:3]) + nn.Conv(
        e4e.STYLE_DIM, (1, 1), name="latlayer1")(c2)
    p1 = e4e.upsample_bilinear_aligned(p2, c1.shape[1:3]) + nn.Conv(
        e4e.STYLE_DIM, (1, 1), name="latlayer2")(c1)
    codes = []
    for i in range(self.n_styles):
      features = (c3 if i < e4e.COARSE_END else
                  p2 if i < e4e.MIDDLE_END else p1)
      codes.append(e4e.GradualStyleBlock(
          e4e.style_block_convs(i, self.input_size), self.style_dim,
          name=f"styles_{i}")(features))
    return jnp.stack(codes, axis=1)


class ProgressiveBackboneEncoder(nn.Module):
  """ReStyle's backbone: (B, 256, 256, 6) → code deltas (B, n, 512)."""
  n_styles: int
  style_dim: int = e4e.STYLE_DIM
  input_size: int = e4e.INPUT_SIZE

  @nn.compact
  def __call__(self, x):
    x = irse.body(irse.stem(x), e4e.NUM_LAYERS, se=True)[-1]  # 16²
    convs = e4e.style_block_convs(0, self.input_size)  # down from 16²
    block = lambda i: e4e.GradualStyleBlock(convs, self.style_dim,
                                            name=f"styles_{i}")
    w0 = block(0)(x)
    codes = [w0]
    for i in range(1, self.n_styles):
      codes.append(w0 + block(i)(x))
    return jnp.stack(codes, axis=1)


def build_model(config):
  """The Flax module of a pSp or ReStyle config (e4e: `e4e.build_model`)."""
  arch = config.get("arch", "e4e")
  sizes = dict(n_styles=config["n_latent"], style_dim=config["style_dim"],
               input_size=config["input_size"])
  if arch == "psp":
    return GradualStyleEncoder(**sizes)
  if arch == "restyle":
    return ProgressiveBackboneEncoder(**sizes)
  if arch == "e4e":
    return e4e.Encoder4Editing(**sizes)
  raise ValueError(f"unknown encoder arch {arch!r}; expected one of {ARCHS}")


def make_config(arch, size):
  config = e4e.make_config(size)
  if arch != "e4e":
    config.update(arch=arch, input_nc=RESTYLE_INPUT_NC if arch == "restyle"
                  else 3)
  return config


def arch_of(E):
  return E.config.get("arch", "e4e")


def _locate(path, arch=None):
  """(directory, kind) of the converted encoder `path` is or contains (of
  several, the one of `arch`)."""
  path = os.fspath(path)
  if not os.path.exists(path):
    raise checkpoint.CheckpointError(
        f"{path} does not exist. Convert an encoder bundle into it first: "
        "`python -m converters.encoder --src BUNDLE.pt --dst DIR`.")
  try:
    kind, _ = checkpoint.read_config(path)
    return path, kind
  except checkpoint.CheckpointError:
    pass
  found = []
  for kind in ARCHS:
    sub = os.path.join(path, kind)
    try:
      if checkpoint.read_config(sub)[0] == kind:
        found.append((sub, kind))
    except checkpoint.CheckpointError:
      continue
  if len(found) == 1:
    return found[0]
  if arch is not None and arch in [k for _, k in found]:
    return dict((k, d) for d, k in found)[arch], arch
  if not found:
    raise checkpoint.CheckpointError(
        f"{path} holds no converted encoder (none of {', '.join(ARCHS)}/); "
        "convert one with `python -m converters.encoder --src BUNDLE.pt "
        "--dst DIR`.")
  raise checkpoint.CheckpointError(
      f"{path} holds several encoders ({', '.join(k for _, k in found)}); "
      "pass the sub-directory of the one you mean.")


def load(path, arch=None):
  """Loads a converted e4e, pSp or ReStyle encoder (a directory, or a
  bundle holding e4e/, psp/ or restyle/) as an `e4e.Encoder`.

  arch: the architecture you expect ('e4e' | 'psp' | 'restyle'); a
  checkpoint of another one is refused naming both.
  """
  directory, kind = _locate(path, arch)
  if kind not in ARCHS:
    raise checkpoint.CheckpointError(
        f"{directory} holds a {kind!r} checkpoint, not an encoder (expected "
        f"one of {', '.join(ARCHS)}).")
  if arch is not None and kind != arch:
    raise checkpoint.CheckpointError(
        f"{directory} holds {'an' if kind == 'e4e' else 'a'} {TITLES[kind]} "
        "encoder, expected "
        f"{TITLES[arch]}.")
  if kind == "e4e":
    return e4e.load(directory)
  tree, config = checkpoint.load(directory, kind)
  if set(tree) != {"params", "latent_avg"} or config.get("arch") != kind:
    raise checkpoint.CheckpointError(
        f"{directory} is not {TITLES[kind]} checkpoint written by "
        "converters.encoder; re-run the converter.")
  n = config["n_latent"]
  if tuple(tree["latent_avg"].shape) != (n, config["style_dim"]):
    raise checkpoint.CheckpointError(
        f"{directory}: latent_avg has shape {tuple(tree['latent_avg'].shape)}, "
        f"config says ({n}, {config['style_dim']}); re-run the converter.")
  return e4e.Encoder(params=tree["params"], config=config,
                     latent_avg=tree["latent_avg"])


def check_compatible(E, G, arch=None):
  """Raises CheckpointError (one line) unless encoder E is `arch` (when
  given) and its W+ codes fit generator G."""
  got = arch_of(E)
  if arch is not None and got != arch:
    raise checkpoint.CheckpointError(
        f"the encoder is {TITLES[got]}, expected {TITLES[arch]}; convert "
        f"the {TITLES[arch].split()[0]} bundle with `python -m "
        "converters.encoder`.")
  have = (E.config["n_latent"], E.config["style_dim"])
  want = (G.n_latent, G.config["style_dim"])
  if have != want:
    raise checkpoint.CheckpointError(
        f"the {TITLES[got]} encoder predicts {have[0]}×{have[1]} W+ codes "
        f"({E.config['size']}² bundle) but the {G.config['size']}² generator "
        f"takes {want[0]}×{want[1]}; use the generator of the same bundle.")


@functools.partial(jax.jit, static_argnames=("batch",))
def _restyle_start(E, G, batch):
  """The codes latent_avg and their image, repeated over the batch."""
  avg = jnp.asarray(E.latent_avg)[None]
  image = G.synthesis(G.params, avg)
  return (jnp.broadcast_to(avg, (batch,) + avg.shape[1:]),
          jnp.broadcast_to(image, (batch,) + image.shape[1:]))


@jax.jit
def _restyle_step(E, G, x, previous, codes):
  size = E.config["input_size"]
  pooled = ops.adaptive_avg_pool(previous, size)  # AdaptiveAvgPool2d((256, 256))
  delta = E.module.apply({"params": E.params},
                        jnp.concatenate([x, pooled], axis=-1))
  codes = codes + delta
  return codes, G.synthesis(G.params, codes)


def restyle_invert(E, G, images, iterations=5):
  """ReStyle's iterative inversion, as GANInverter's restyle_infer.py.

  Starts from the image of E.latent_avg (G's fixed noise, no truncation)
  and the codes latent_avg; each iteration adds E(cat(x, pool(previous
  image))) to the codes and renders them, where x is `images` (NHWC in
  [-1, 1], resized to 256² like the e4e input) and pool is PyTorch's
  AdaptiveAvgPool2d to 256² (for a generator below 256² it repeats pixels).

  Returns (codes (iterations, B, n_latent, 512), images (iterations, B, H,
  W, 3)).
  """
  check_compatible(E, G, "restyle")
  images = jnp.asarray(images)
  if images.ndim != 4 or images.shape[-1] != 3:
    raise ValueError(
        f"restyle_invert expects NHWC RGB images (B, H, W, 3), got "
        f"{images.shape}")
  if iterations < 1:
    raise ValueError(f"iterations must be >= 1, got {iterations}")
  x = e4e.resize_for_encoder(images, E.config["input_size"])
  codes, previous = _restyle_start(E, G, x.shape[0])
  all_codes, all_images = [], []
  for _ in range(iterations):
    codes, previous = _restyle_step(E, G, x, previous, codes)
    all_codes.append(codes)
    all_images.append(previous)
  return jnp.stack(all_codes), jnp.stack(all_images)


def init_encoder(seed, arch, size, latent_avg, input_size=e4e.INPUT_SIZE,
                 head_scale=1.0):
  """A stand-in encoder `arch` of seeded random weights for a generator of
  `size` whose W+ codes start from `latent_avg` (n_latent, style_dim).

  input_size below 256: the trunk reads smaller images (a small generator's
  demo). Weights are drawn with numpy (`RandomState(seed)`, the same on
  every machine): convolution and dense kernels normal with variance
  1/fan_in (the style heads' last layer times head_scale, as their outputs
  are the code offsets), biases 0, BatchNorm the identity, PReLU 0.25.
  """
  latent_avg = jnp.asarray(latent_avg, jnp.float32)
  config = make_config(arch, size)
  config.update(style_dim=int(latent_avg.shape[-1]), input_size=int(
      input_size))
  x = jax.ShapeDtypeStruct((1, input_size, input_size,
                            config.get("input_nc", 3)), jnp.float32)
  shapes = jax.eval_shape(build_model(config).init, jax.random.PRNGKey(0),
                          x)["params"]
  params = irse.random_params(shapes, seed,
                              lambda path: path[-2].key == "linear",
                              head_scale)
  return e4e.Encoder(params=params, config=config, latent_avg=latent_avg)
