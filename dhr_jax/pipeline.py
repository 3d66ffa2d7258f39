"""DHR over a batch of images: embed → DSS → refine → edits → metrics.

Pure functions of arrays (no file reading or writing; `dhr_jax.runner` and
`dhr_jax.io` do that). One batch goes through

  1. domain-specific segmentation: a 40-step coarse W inversion, LPIPS-VGG
     error maps, SLIC superpixels, thresholds (and a parser if there is one);
  2. embedding: W+ codes from the e4e encoder, or by optimisation in W or
     W+ (from the generator's latent_avg, or continuing the coarse
     inversion);
  3. hybrid refinement of the generator weights (in-domain) and a feature
     offset (out-of-domain);
  4. edits of the refined inversion (InterFaceGAN / GANSpace / a seeded
     random direction), rendered with the refined weights, offset and mask;
  5. metrics against the input (MSE, PSNR, LPIPS-Alex, LPIPS-VGG, mask
     fractions) and, for synthetic inputs, against the known ground truth.

Stages 1-3 run batched (vmapped inside each stage), the batch axis sharded
over a 1-D mesh of devices: one device is a mesh of one, through the same
code. Randomness comes from one key per image derived
from the run seed and the image *name*, and every per-image computation is
independent of the others, so an image gets the same result whatever batch
or batch position it lands in (resume relies on this).
"""
import dataclasses
import functools
import hashlib
import time
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image
import skimage.data

from dhr_jax import editing
from dhr_jax import embedding as embedding_lib
from dhr_jax import io
from dhr_jax import metrics as metrics_lib
from dhr_jax import refine as refine_lib
from dhr_jax import segmentation
from dhr_jax.models.stylegan2 import Generator

EMBEDDINGS = ("e4e", "optim")
# The paper's protocol (`metrics.paper_metrics`: the inversion as a truncated
# uint8 picture, both images at 256², MSE on [-1, 1], PSNR = 10·log10(2/MSE),
# LPIPS-Alex), beside the full-resolution float metrics above.
PAPER_METRICS = ("paper_mse", "paper_psnr", "paper_lpips_alex")
# Where the optimisation embedding starts (`embed`).
EMBEDDING_INITS = ("latent_avg", "coarse")
METRICS = ("mse", "psnr", "lpips_alex", "lpips_vgg", "in_domain",
           "out_of_domain") + PAPER_METRICS
GT_METRICS = ("gt_recall", "gt_iou", "gt_rest_in", "psnr_in_embed",
              "psnr_in", "psnr_out_embed", "psnr_out")


class PipelineError(ValueError):
  """The configuration cannot run (unknown method, missing model, ...)."""


# --------------------------------------------------------------------------
# Models and keys


@dataclasses.dataclass(eq=False)
class Models:
  """Everything a batch needs besides the images.

  G: generator;  lpips_vgg / lpips_alex: LPIPS metrics;  encoder: e4e
  (`embedding.method = 'e4e'`);  parser: optional face parser for DSS;
  w_stats: (mean, spread) of W for the optimisation-based inversions;
  id_network: optional IR-101 of the paper's ID metric (scored on host, not
  replicated);  mesh: a 1-D `jax.sharding.Mesh` (axis 'batch'); None: the first local
  device alone.
  """
  G: Generator
  lpips_vgg: Any
  lpips_alex: Any
  encoder: Any = None
  parser: Any = None
  w_stats: Any = None
  id_network: Any = None
  mesh: Any = None

  def __post_init__(self):
    if self.mesh is None:
      self.mesh = make_mesh(jax.local_devices()[:1])

  @property
  def n_devices(self):
    return self.mesh.devices.size


def make_mesh(devices=None):
  """A 1-D mesh named 'batch' over `devices` (one device: a mesh of one).

  Default: this process's devices (in a multi-process run every process
  refines its own images on its own devices, see `runner.init_distributed`).
  """
  devices = jax.local_devices() if devices is None else list(devices)
  return jax.sharding.Mesh(np.asarray(devices), ("batch",))


def _replicated(mesh):
  return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())


def _batched(mesh):
  return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("batch"))


def _shard(models, x):
  """The batch axis of x over the mesh's devices."""
  return jax.device_put(x, _batched(models.mesh))


def prepare_models(G, lpips_vgg, lpips_alex, *, encoder=None, parser=None,
                   id_network=None, seed=0, n_mean_latent=10000, mesh=None):
  """Bundles the models; replicates their weights over `mesh` (None: the
  first local device alone).

  w_stats (the W mean the optimisations start from, and its spread) are
  computed once here from the run seed, so every image starts alike.
  """
  if mesh is None:
    mesh = make_mesh(jax.local_devices()[:1])
  # Models are pytrees: their weights are replicated, configs untouched.
  G, lpips_vgg, lpips_alex, encoder, parser = jax.device_put(
      (G, lpips_vgg, lpips_alex, encoder, parser), _replicated(mesh))
  key = jax.random.fold_in(jax.random.PRNGKey(seed), 0x57A75)
  w_stats = jax.device_put(embedding_lib.latent_stats(G, key, n_mean_latent),
                           _replicated(mesh))
  return Models(G=G, lpips_vgg=lpips_vgg, lpips_alex=lpips_alex,
                encoder=encoder, parser=parser, w_stats=w_stats,
                id_network=id_network, mesh=mesh)


def image_key(seed, name, stage):
  """PRNG key of one image and stage, from the run seed and the image name.

  Not from the batch position: a resumed run (or another batch size) gives
  every image the same randomness.
  """
  digest = hashlib.sha256(f"{name}\0{stage}".encode("utf-8")).digest()
  words = np.frombuffer(digest[:8], np.uint32)
  key = jax.random.PRNGKey(seed)
  for w in words:
    key = jax.random.fold_in(key, int(w))
  return np.asarray(key)


def image_keys(seed, names, stage):
  return np.stack([image_key(seed, n, stage) for n in names])


# --------------------------------------------------------------------------
# Edits


@dataclasses.dataclass(frozen=True)
class EditSpec:
  """One named edit: `fn(codes (B, L, D)) → (B, S, L, D)`, with one output
  label per edited code (used as the file name `edits/<label>.png`)."""
  name: str
  labels: tuple
  fn: Callable = dataclasses.field(compare=False)


def format_strength(s):
  """3.0 → '3', -1.5 → '-1.5' (file-name friendly, stable)."""
  return f"{float(s):g}"


def interfacegan(name, direction, strengths, layers=None):
  """InterFaceGAN edit w + α·n for every α (see `editing.edit_codes`)."""
  strengths = tuple(float(s) for s in strengths)
  direction = np.asarray(direction, np.float32)
  return EditSpec(
      name, tuple(f"{name}_{format_strength(s)}" for s in strengths),
      lambda codes: editing.edit_codes(codes, direction, strengths, layers))


def ganspace(name, pcs, edits, mode="add"):
  """GANSpace layer-wise edits (see `editing.ganspace_edit`); one output per
  edit, labelled `<name>_<component>_<first>-<last>_<strength>`."""
  labels = []
  for e in edits:
    group = [e] if np.isscalar(e[0]) else list(e)
    labels.append(name + "_" + "+".join(
        f"{int(c)}_{int(a)}-{int(b)}_{format_strength(s)}"
        for c, a, b, s in group))
  edits = list(edits)
  return EditSpec(name, tuple(labels),
                  lambda codes: editing.ganspace_edit(codes, pcs, edits, mode))


def random_direction(seed, style_dim):
  """A seeded random unit direction in W (the demo's stand-in attribute)."""
  n = np.random.RandomState(seed).standard_normal(style_dim)
  return (n / np.linalg.norm(n)).astype(np.float32)


def edited_codes(edits, codes):
  """Every edit of codes (B, L, D) → (codes (B, S, L, D), S labels)."""
  edited = jnp.concatenate([e.fn(codes) for e in edits], axis=1)
  labels = [l for e in edits for l in e.labels]
  if edited.shape[1] != len(labels):
    raise PipelineError(f"edits produced {edited.shape[1]} codes for "
                        f"{len(labels)} labels")
  return edited, labels


def render_edits(G, refined, edits):
  """{label: (H, W, 3) float image} of every edit of ONE refined inversion.

  refined: a `refine.Refinement` of one image, `result[i]` of the run's
  refinement or `refine.load_refined`; both hold bit-identical arrays, so
  editing during a run and re-editing a saved workdir render the same
  images (one program, the same inputs).
  """
  if not edits:
    return {}
  codes, labels = edited_codes(edits, refined.codes)
  images = np.asarray(editing.render(G, refined, codes)[0])
  return {l: images[j] for j, l in enumerate(labels)}


def generator_edits(G, codes, edits):
  """{label: image} of every edit of ONE image's codes (1, L, D), rendered
  by the generator itself (no refinement)."""
  if not edits:
    return {}
  codes, labels = edited_codes(edits, jnp.asarray(codes, jnp.float32))
  images = np.asarray(synthesize(G, codes[0]))
  return {l: images[j] for j, l in enumerate(labels)}


# --------------------------------------------------------------------------
# Metrics


def psnr(mse):
  """PSNR in dB for images in [0, 1]."""
  return float("inf") if mse <= 0 else float(10.0 * np.log10(1.0 / mse))


def image_metrics(image, target, mask, lpips_alex, lpips_vgg):
  """Per-image metrics of a batch as a list of dicts.

  image, target: (B, H, W, 3) in [-1, 1] (image is clipped to it, as it is
  saved); mask: (B, H, W, 1), 1 = in-domain. MSE and PSNR are on [0, 1].
  The paper_* entries are `metrics.paper_metrics` of the unclipped image.
  """
  # LPIPS on the device arrays as given; only MSE needs host copies.
  xa = jnp.clip(jnp.asarray(image, jnp.float32), -1.0, 1.0)
  ya = jnp.asarray(target, jnp.float32)
  x, y = np.asarray(xa), np.asarray(ya)
  mse = np.mean(((x - y) / 2.0) ** 2, axis=(1, 2, 3))
  alex = np.asarray(lpips_alex.jit_distance(lpips_alex.params, xa, ya))
  vgg = np.asarray(lpips_vgg.jit_distance(lpips_vgg.params, xa, ya))
  inside = np.mean(np.asarray(mask, np.float32), axis=(1, 2, 3))
  # The uint8 target is the input as inverted (the pixels written as
  # input.png): the runner loads each file as u / 127.5 − 1 at the
  # generator's size, which io.to_uint8 maps back to u exactly. (The
  # official script resizes the file itself; the same picture for inputs at
  # the generator's size, such as FFHQ-aligned 1024² crops.)
  paper = metrics_lib.paper_metrics(image, io.to_uint8(y), lpips_alex)
  return [dict(mse=float(mse[i]), psnr=psnr(mse[i]),
               lpips_alex=float(alex[i]), lpips_vgg=float(vgg[i]),
               in_domain=float(inside[i]), out_of_domain=float(1 - inside[i]),
               paper_mse=float(paper["mse"][i]),
               paper_psnr=float(paper["psnr"][i]),
               paper_lpips_alex=float(paper["lpips"][i]))
          for i in range(x.shape[0])]


@dataclasses.dataclass(frozen=True)
class GroundTruth:
  """What a synthetic input is made of.

  out: (H, W) bool, True on the pasted (out-of-domain) patch; codes:
  (n_latent, style_dim), the W+ codes the generator drew the rest from.
  """
  out: np.ndarray
  codes: np.ndarray


def ground_truth_metrics(image, embedded, target, mask, truth):
  """How well DSS and the refinement did on a synthetic image (one image).

  truth: its `GroundTruth`. Returns the recall of the patch as
  out-of-domain, the IoU of the out-of-domain mask with it, the fraction of
  the rest kept in-domain, and PSNR inside and outside the patch for the
  embedding alone and after refinement.
  """
  out = np.asarray(mask)[..., 0] < 0.5
  gt = np.asarray(truth.out, bool)
  return dict(
      gt_recall=float(np.mean(out[gt])),
      gt_iou=float(np.sum(out & gt) / max(np.sum(out | gt), 1)),
      gt_rest_in=float(np.mean(~out[~gt])),
      psnr_in_embed=_region_psnr(embedded, target, ~gt),
      psnr_in=_region_psnr(image, target, ~gt),
      psnr_out_embed=_region_psnr(embedded, target, gt),
      psnr_out=_region_psnr(image, target, gt))


def _region_psnr(x, reference, region):
  # Both as pictures are seen: clipped to [-1, 1].
  clip = lambda a: np.clip(np.asarray(a, np.float32), -1, 1)
  d = ((clip(x) - clip(reference)) / 2.0) ** 2
  return psnr(float(np.mean(d[region])))


def edit_fidelity(G, truth, edits, rendered):
  """How closely one image's edits follow the true ones (synthetic inputs).

  The true edit of a synthetic image is the generator's own image of its
  edited true codes, G(e(w_true)) (no patch: the patch is not the
  generator's to edit). rendered: {label: (H, W, 3)} the method's edits of
  `edits`. Returns {'edit_psnr_in': PSNR (dB) outside the patch, mean over
  the edits}; {} without edits.
  """
  true = generator_edits(G, np.asarray(truth.codes)[None], edits)
  keep = ~np.asarray(truth.out, bool)
  if not true:
    return {}
  return dict(edit_psnr_in=float(np.mean([
      _region_psnr(rendered[l], true[l], keep) for l in true])))


# --------------------------------------------------------------------------
# Synthetic inputs (the demo)


def synthetic_case(G, seed, index, patch_fraction=1 / 3):
  """A generator image with a foreign patch at a known place.

  G(w) for a seeded z, with a crop of the `skimage.data` astronaut (a real
  photograph, far from what a small random generator draws) pasted over a
  square of side patch_fraction·size at a seeded position. Returns
  (target uint8 (H, W, 3), `GroundTruth`). Deterministic in (G, seed,
  index).
  """
  rng = np.random.RandomState([seed, index])
  size = G.config["size"]
  z = jnp.asarray(rng.standard_normal((1, G.z_dim)), jnp.float32)
  w = G.mapping(G.params, z)
  wplus = jnp.repeat(w[:, None], G.n_latent, 1)
  clean = G.synthesis(G.params, wplus)
  target = segmentation.to_uint8(clean)[0]
  n = max(4, int(round(size * patch_fraction)))
  y0, x0 = (int(v) for v in rng.randint(0, size - n + 1, size=2))
  photo = skimage.data.astronaut()
  top, left = rng.randint(0, 200), rng.randint(100, 200)
  crop = Image.fromarray(photo[top:top + 260, left:left + 260]).resize(
      (n, n), Image.LANCZOS)
  target[y0:y0 + n, x0:x0 + n] = np.asarray(crop)
  gt = np.zeros((size, size), bool)
  gt[y0:y0 + n, x0:x0 + n] = True
  return target, GroundTruth(out=gt, codes=np.asarray(wplus[0]))


# --------------------------------------------------------------------------
# One batch


@dataclasses.dataclass
class ImageResult:
  """Everything computed for one image (numpy, batch axis removed).

  ok / reason: False and why when the image failed (non-finite losses or
  outputs); refined: a `refine.Refinement` of this image, for saving and
  re-editing.
  """
  name: str
  ok: bool
  reason: str
  target: np.ndarray
  embedding: np.ndarray
  coarse: np.ndarray
  mask: np.ndarray
  superpixels: np.ndarray
  boundaries: np.ndarray
  parsing: Optional[np.ndarray]
  error_map: np.ndarray
  image: np.ndarray
  refined: Any
  edits: dict
  metrics: dict
  losses_in: np.ndarray
  losses_out: np.ndarray


def _pad(x, n):
  x = np.asarray(x)
  if x.shape[0] == n:
    return x
  reps = np.repeat(x[-1:], n - x.shape[0], axis=0)
  return np.concatenate([x, reps], axis=0)


def padded_size(count, batch_size, n_devices=1):
  """batch_size rounded up to a multiple of the device count."""
  b = int(batch_size) if batch_size else count
  return -(-b // n_devices) * n_devices


def check_compatible(G, encoder):
  """Raises PipelineError unless the encoder's W+ codes fit the generator."""
  got = (encoder.config["n_latent"], encoder.config["style_dim"])
  want = (G.n_latent, G.config["style_dim"])
  if got != want:
    raise PipelineError(
        f"the encoder predicts {got[0]}×{got[1]} W+ codes "
        f"({encoder.config.get('size', '?')}² bundle) but the "
        f"{G.config['size']}² generator takes {want[0]}×{want[1]}; use the "
        "generator of the same e4e bundle (leave model.generator empty)")


def step_reporter(progress, head, steps):
  """A stage reporter `progress(stage)` (or None) → the `progress(k)` of a
  compiled loop of `steps` steps, telling it '<head> step k/steps' (step 0
  at once); None stays None, so that the loop is compiled without its
  callback."""
  if progress is None:
    return None
  progress(f"{head} step 0/{steps}")
  return lambda k: progress(f"{head} step {k}/{steps}")


def embed(models, config, target, names, seed, coarse_codes=None,
          loss_target=None, progress=None):
  """W+ codes (B, n_latent, d) and the embedding image (B, H, W, 3).

  'e4e' encodes the images. 'optim' optimises codes in config.space for
  config.steps steps from config.init: 'latent_avg' (the official
  optimisation embedding, PTI's W pivot: a fresh run from the generator's
  latent_avg, `embedding.latent_avg_or_mean`) or 'coarse' (continues DSS's
  coarse W inversion `coarse_codes`, which already spent
  `dss.coarse_steps` steps; a shortcut of this project, e.g. the demo's).
  steps = 0 takes the start itself. Its loss compares with `loss_target`
  (default `io.resize_target(target)`, the official 256²). progress:
  optional `progress(stage)`, told 'embedding step k/N' by the optimisation.
  """
  method = config.method
  G = models.G
  if method == "e4e":
    if models.encoder is None:
      raise PipelineError("embedding.method='e4e' needs the e4e encoder "
                          "(model.checkpoint: the converted e4e bundle)")
    enc = models.encoder
    check_compatible(G, enc)
    codes = enc.encode(enc.params, target)
    return codes, _synthesize(G, codes)
  if method == "optim":
    if config.space not in ("w", "w+"):
      raise PipelineError(f"embedding.space must be 'w' or 'w+', got "
                          f"{config.space!r}")
    start = config.get("init", "latent_avg")
    if start not in EMBEDDING_INITS:
      raise PipelineError(f"embedding.init must be one of "
                          f"{EMBEDDING_INITS}, got {start!r}")
    if start == "coarse":
      if coarse_codes is None:
        raise PipelineError("embedding.init='coarse' continues the coarse "
                            "inversion; pass its codes")
      codes = jnp.asarray(coarse_codes, jnp.float32)
    else:
      avg = embedding_lib.latent_avg_or_mean(G, models.w_stats)
      codes = _shard(models, np.broadcast_to(
          np.asarray(avg), (target.shape[0], G.n_latent, avg.shape[-1])))
    if int(config.steps) > 0:
      keys = _shard(models, image_keys(seed, names, "embedding"))
      init = codes if config.space == "w+" else codes[:, 0]
      if loss_target is None:
        loss_target = _shard(models, io.resize_target(target))
      res = embedding_lib.optimize_latent(
          G, loss_target, models.lpips_vgg, key=keys, steps=int(config.steps),
          space=config.space, lr=float(config.lr),
          mse_lambda=float(config.mse_lambda), w_stats=models.w_stats,
          init=init, progress=step_reporter(progress, "embedding",
                                            int(config.steps)))
      codes = res.codes
    # Refinement renders with the generator's fixed noise, not the noise
    # maps the optimisation tuned, so the embedding is shown the same way
    # (as the official PTI renders its pivot: randomize_noise=False).
    return codes, _synthesize(G, codes)
  raise PipelineError(f"embedding.method must be one of {EMBEDDINGS}, got "
                      f"{method!r}")


@jax.jit
def _synthesize(G, codes):
  return G.synthesis(G.params, codes, G.noise)


def synthesize(G, codes):
  """G(codes) with the generator's own weights and fixed noise (the
  unrefined inversion): (B, n_latent, d) → (B, H, W, 3)."""
  return _synthesize(G, jnp.asarray(codes, jnp.float32))


def _refine(models, codes, x, mask, kwargs):
  """`refine.hybrid_refine` on the batch, each device refining its shard.

  Every image's refinement is independent, so the batch is split with
  `shard_map` and each device refines its own images (`refine.map_images`)
  (the weights, noise and LPIPS replicated). Leaving it to the automatic
  partitioner instead fails: per-image weights make the generator's
  convolutions grouped ones, which it cannot split along the batch. On a
  mesh of one device this is bit-identical to calling `hybrid_refine`
  directly (measured on the 32² stand-in generator: every output array
  equal, max |difference| 0).
  """
  G = models.G
  synthesis, offset, mask_feature, image, losses_in, losses_out = (
      _sharded_refine(G, models.lpips_alex, codes, x, mask,
                      mesh=models.mesh,
                      kwargs=tuple(sorted(kwargs.items()))))
  return refine_lib.Refinement(
      synthesis=synthesis, mapping=G.params["mapping"],
      codes=jnp.asarray(codes, jnp.float32), offset=offset,
      mask_feature=mask_feature, noise=list(G.noise),
      feature_idx=int(kwargs["feature_idx"]), mode=kwargs["mode"],
      image=image, losses_in=losses_in, losses_out=losses_out)


@functools.partial(jax.jit, static_argnames=("mesh", "kwargs"))
def _sharded_refine(G, lpips_alex, codes, x, mask, *, mesh, kwargs):
  P = jax.sharding.PartitionSpec

  def local(G, lpips_alex, codes, x, mask):
    r = refine_lib.hybrid_refine(G, codes, x, mask, lpips_alex=lpips_alex,
                                 **dict(kwargs))
    return (r.synthesis, r.offset, r.mask_feature, r.image, r.losses_in,
            r.losses_out)

  return jax.shard_map(
      local, mesh=mesh,
      in_specs=(P(), P(), P("batch"), P("batch"), P("batch")),
      out_specs=P("batch"), check_vma=False)(G, lpips_alex, codes, x, mask)


def _finite(*arrays):
  return all(bool(np.all(np.isfinite(np.asarray(a)))) for a in arrays)


@dataclasses.dataclass
class Embedded:
  """A batch after segmentation and embedding, before any refinement.

  x: (b, H, W, 3) padded targets on the device(s); target: the n real ones
  (numpy); names / padded_names; dss: the `segmentation` result; codes: W+
  codes (b, n_latent, d); embedded: (b, H, W, 3) G(codes) as numpy.
  Several refinements (`refine_batch`) can start from the same one.
  """
  x: Any
  target: np.ndarray
  names: list
  padded_names: list
  dss: Any
  codes: Any
  embedded: np.ndarray
  times: dict


def segment_and_embed(models, config, target, names, *, progress=None,
                      landmarks=None):
  """Stages 1-2 of `run_batch` (DSS, then the embedding) → `Embedded`."""
  G = models.G
  n = len(names)
  size = G.config["size"]
  target = np.asarray(target, np.float32)
  if target.shape != (n, size, size, 3):
    raise PipelineError(f"target must be ({n}, {size}, {size}, 3), got "
                        f"{target.shape}")
  b = padded_size(n, config.batch_size, models.n_devices)
  if n > b:
    raise PipelineError(f"{n} images for a batch of {b}")
  padded_names = list(names) + [names[-1]] * (b - n)
  x = _pad(target, b)
  # The optimisation embedding's target: the official code's 256² resize.
  x_loss = _shard(models, io.resize_target(x))
  x = _shard(models, x)
  seed = int(config.seed)
  times = {}
  report = progress or (lambda stage: None)

  t = time.perf_counter()
  coarse_keys = _shard(models, image_keys(seed, padded_names, "coarse"))
  dss_config = config.dss.to_dict() if hasattr(config.dss, "to_dict") else (
      dict(config.dss))
  steps = int(dss_config["coarse_steps"])
  inv = embedding_lib.coarse_inversion(
      G, x_loss, models.lpips_vgg, key=coarse_keys, steps=steps,
      w_stats=models.w_stats,
      progress=step_reporter(progress, "coarse inversion", steps))
  report("segmentation")
  dss = segmentation.domain_specific_segmentation(
      x, coarse=inv.last_step_image, coarse_codes=inv.codes,
      lpips_vgg=models.lpips_vgg, parser=models.parser, config=dss_config,
      landmarks=None if landmarks is None else _pad(landmarks, b))
  times["dss"] = time.perf_counter() - t

  t = time.perf_counter()
  report("embedding")
  codes, embedded = embed(models, config.embedding, x, padded_names, seed,
                          coarse_codes=inv.codes, loss_target=x_loss,
                          progress=progress)
  times["embed"] = time.perf_counter() - t
  return Embedded(x=x, target=target, names=list(names),
                  padded_names=padded_names, dss=dss, codes=codes,
                  embedded=np.asarray(embedded), times=times)


def refine_kwargs(refine_config):
  """config.refine → the keyword arguments of `refine.hybrid_refine`."""
  rc = refine_config
  return dict(
      feature_idx=int(rc.feature_idx), feature_steps=int(rc.feature_steps),
      weight_steps=int(rc.weight_steps), weight_lr=float(rc.weight_lr),
      feature_lr=float(rc.feature_lr), l2_lambda=float(rc.l2_lambda),
      lpips_lambda=float(rc.lpips_lambda), mode=str(rc.mode),
      mse_norm=str(rc.mse_norm))


def refine_batch(models, refine_config, emb, *, progress=None):
  """Stage 3 of `run_batch`: the refinement of an `Embedded` batch with
  `refine_config` (config.refine's fields) → a batched `refine.Refinement`
  (padding included), ready."""
  report = progress or (lambda stage: None)
  mask = _shard(models, emb.dss.mask)
  kwargs = refine_kwargs(refine_config)
  steps = kwargs["feature_steps"]
  report(f"refinement step 0/{steps}")
  last = [0]

  def step_done(k):
    # Under shard_map every device reports each step: show each k once. On
    # CPU the images of a batch are refined one after another
    # (`refine.map_images`), so k runs from 1 to steps once per image.
    if k != last[0]:
      last[0] = k
      report(f"refinement step {k}/{steps}")
  with refine_lib.on_step(step_done):
    result = _refine(models, emb.codes, emb.x, mask, kwargs)
    # Dispatch is asynchronous: wait inside the block so that every step
    # is reported while someone listens.
    jax.block_until_ready((result.synthesis, result.offset, result.image,
                           result.losses_in, result.losses_out))
  return result


def run_batch(models, config, target, names, *, edits=(), ground_truth=None,
              progress=None, landmarks=None):
  """Runs the pipeline on one batch.

  Args:
    models: `Models`.
    config: the run config (fields embedding, dss, refine, seed,
      batch_size).
    target: (n, H, W, 3) float images in [-1, 1] at the generator size,
      n ≤ batch_size; the batch is padded to batch_size (rounded up to a
      multiple of the device count) by repeating the last image, and the
      padding is dropped from the results.
    names: n image names (they seed the per-image randomness).
    edits: `EditSpec`s rendered for every image.
    ground_truth: optional {name: `GroundTruth`} of synthetic inputs.
    progress: optional `progress(stage)`, told the stage as it starts
      ('coarse inversion step k/N' (DSS's), 'segmentation', 'embedding'
      [and 'embedding step k/N' when it optimises], 'refinement step k/N',
      'metrics', 'edits'); the steps are reported from XLA's callback
      thread while the compiled loops run.
    landmarks: optional (n, 5, 2) five landmarks per image for the parser
      (`dhr_jax.photos.parser_landmarks`; an all-NaN row: no face found);
      None: the canonical FFHQ ones.

  Returns:
    ([ImageResult] for the n real images, {stage: seconds}).
  """
  emb = segment_and_embed(models, config, target, names, progress=progress,
                          landmarks=landmarks)
  times = dict(emb.times)
  t = time.perf_counter()
  result = refine_batch(models, config.refine, emb, progress=progress)
  times["refine"] = time.perf_counter() - t
  out, more = finish_batch(models, emb, result, edits=edits,
                           ground_truth=ground_truth, progress=progress)
  times.update(more)
  return out, times


def finish_batch(models, emb, result, *, edits=(), ground_truth=None,
                 progress=None):
  """Stages 4-5 of `run_batch` (metrics, edits) of one refinement of `emb`
  → ([ImageResult], {stage: seconds})."""
  G = models.G
  names, target, dss, x = emb.names, emb.target, emb.dss, emb.x
  embedded = emb.embedded
  n = len(names)
  times = {}
  report = progress or (lambda stage: None)
  image = np.asarray(result.image)
  losses_in = np.asarray(result.losses_in)
  losses_out = np.asarray(result.losses_out)

  t = time.perf_counter()
  report("metrics")
  metrics = image_metrics(result.image[:n], x[:n], dss.mask[:n],
                          models.lpips_alex, models.lpips_vgg)
  times["metrics"] = time.perf_counter() - t

  t = time.perf_counter()
  report("edits")
  codes = np.asarray(emb.codes)
  out = []
  for i, name in enumerate(names):
    ok = _finite(losses_in[i], losses_out[i], image[i], codes[i])
    reason = "" if ok else (
        "non-finite loss or output (NaN/inf) during embedding or refinement")
    refined = result[i] if ok else None
    rendered = render_edits(G, refined, edits) if ok else {}
    if ok and not _finite(*rendered.values()):
      ok, reason = False, "an edit rendered non-finite values (NaN/inf)"
    m = dict(metrics[i])
    if ground_truth is not None and name in ground_truth:
      m.update(ground_truth_metrics(image[i], embedded[i], target[i],
                                    dss.mask[i], ground_truth[name]))
    out.append(ImageResult(
        name=name, ok=ok, reason=reason, target=target[i],
        embedding=embedded[i], coarse=np.asarray(dss.coarse[i]),
        mask=np.asarray(dss.mask[i]), superpixels=dss.superpixels[i],
        boundaries=dss.boundaries[i],
        parsing=None if dss.parsing is None else dss.parsing[i],
        error_map=np.asarray(dss.error_map[i]), image=image[i],
        refined=refined, edits=rendered, metrics=m,
        losses_in=losses_in[i], losses_out=losses_out[i]))
  times["edit"] = time.perf_counter() - t
  return out, times
