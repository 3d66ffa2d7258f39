"""A batch of images through DHR's shared stages: DSS, embedding, refinement.

Pure functions of arrays (no file reading or writing; `dhr_jax.workdir`
does that). A batch goes through

  1. domain-specific segmentation: a 40-step coarse W inversion, LPIPS-VGG
     error maps, SLIC superpixels, thresholds (and a parser if there is one);
  2. embedding: W+ codes from an encoder (e4e, pSp, ReStyle), or by optimisation in W or
     W+ (from the generator's latent_avg, or continuing the coarse
     inversion) — `segment_and_embed` does 1 and 2 once per batch;
  3. a refinement of the generator weights (in-domain) and a feature
     offset (out-of-domain) — `refine_batch`, once per method that refines
     (DHR, PTI);

then each method's results are scored (metrics against the input) and its
edits rendered, in that order (`dhr_jax.methods`).

Stages run batched (vmapped inside each stage), the batch axis sharded
over a 1-D mesh of devices (`loading.Models.mesh`): one device is a mesh of
one, through the same code. Randomness comes from one key per image derived
from the run seed and the image *name*, and every per-image computation is
independent of the others, so an image gets the same result whatever batch
or batch position it lands in (resume relies on this).
"""
import dataclasses
import functools
import hashlib
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from dhr_jax import editing
from dhr_jax import embedding as embedding_lib
from dhr_jax import io
from dhr_jax import refine as refine_lib
from dhr_jax import segmentation
from dhr_jax.checkpoint import CheckpointError
from dhr_jax.models import encoders

# Embeddings by a converted encoder of that architecture, or by
# optimisation.
ENCODERS = encoders.ARCHS
EMBEDDINGS = ENCODERS + ("optim",)
# ReStyle's iterations, as its official inference (n_iters_per_batch).
RESTYLE_ITERATIONS = 5
# Where the optimisation embedding starts (`embed`).
EMBEDDING_INITS = ("latent_avg", "coarse")


class PipelineError(ValueError):
  """The configuration cannot run (unknown method, missing model, ...)."""


# --------------------------------------------------------------------------
# Keys and batches


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


def finite(*arrays):
  """Whether every value of every array is finite (no NaN or inf)."""
  return all(bool(np.all(np.isfinite(np.asarray(a)))) for a in arrays)


# --------------------------------------------------------------------------
# Stages


def encode(G, encoder, target, arch=None,
           restyle_iterations=RESTYLE_ITERATIONS):
  """W+ codes and their image G(codes) from a converted encoder: e4e and
  pSp in one pass, ReStyle iterated (the last iteration's codes). Raises
  PipelineError unless the encoder is `arch` (when given) and its codes fit
  G."""
  try:
    encoders.check_compatible(encoder, G, arch)
  except CheckpointError as e:
    raise PipelineError(str(e)) from None
  if encoders.arch_of(encoder) == "restyle":
    codes = encoders.restyle_invert(encoder, G, target,
                                    int(restyle_iterations))[0][-1]
  else:
    codes = encoder.encode(encoder.params, target)
  return codes, editing.render(G, None, codes)


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

  'e4e', 'psp' and 'restyle' encode the images (`encode`; ReStyle with
  config.restyle_iterations). 'optim' optimises codes in config.space for
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
  if method in ENCODERS:
    if models.encoder is None:
      raise PipelineError(f"embedding.method={method!r} needs its encoder "
                          f"(model.checkpoint: the converted {method} "
                          "bundle)")
    return encode(G, models.encoder, target, method, config.get(
        "restyle_iterations", RESTYLE_ITERATIONS))
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
      codes = models.shard(np.broadcast_to(
          np.asarray(avg), (target.shape[0], G.n_latent, avg.shape[-1])))
    if int(config.steps) > 0:
      keys = models.shard(image_keys(seed, names, "embedding"))
      init = codes if config.space == "w+" else codes[:, 0]
      if loss_target is None:
        loss_target = models.shard(io.resize_target(target))
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
    return codes, editing.render(G, None, codes)
  raise PipelineError(f"embedding.method must be one of {EMBEDDINGS}, got "
                      f"{method!r}")


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


@dataclasses.dataclass
class Embedded:
  """A batch after segmentation and embedding, before any refinement.

  x: (b, H, W, 3) padded targets on the device(s); target: the n real ones
  (numpy); names / padded_names; dss: the `segmentation` result; codes: W+
  codes (b, n_latent, d); embedded: (b, H, W, 3) G(codes) as numpy (dss,
  codes and embedded None from `batch_only`).
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


def _padded(models, config, target, names):
  """(target as float32, padded names, padded targets (host)) of a batch."""
  size = models.G.config["size"]
  n = len(names)
  target = np.asarray(target, np.float32)
  if target.shape != (n, size, size, 3):
    raise PipelineError(f"target must be ({n}, {size}, {size}, 3), got "
                        f"{target.shape}")
  b = padded_size(n, config.batch_size, models.n_devices)
  if n > b:
    raise PipelineError(f"{n} images for a batch of {b}")
  return target, list(names) + [names[-1]] * (b - n), _pad(target, b)


def batch_only(models, config, target, names):
  """A batch padded and sharded, without DSS or an embedding (`Embedded`
  with dss, codes and embedded None): for methods that embed themselves."""
  target, padded_names, x = _padded(models, config, target, names)
  return Embedded(x=models.shard(x), target=target, names=list(names),
                  padded_names=padded_names, dss=None, codes=None,
                  embedded=None, times={})


def segment_and_embed(models, config, target, names, *, progress=None,
                      landmarks=None):
  """Stages 1-2 (DSS, then the embedding) → `Embedded`."""
  G = models.G
  target, padded_names, x = _padded(models, config, target, names)
  b = len(padded_names)
  # The optimisation embedding's target: the official code's 256² resize.
  x_loss = models.shard(io.resize_target(x))
  x = models.shard(x)
  seed = int(config.seed)
  times = {}
  report = progress or (lambda stage: None)

  t = time.perf_counter()
  coarse_keys = models.shard(image_keys(seed, padded_names, "coarse"))
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
  """Stage 3: the refinement of an `Embedded` batch with `refine_config`
  (config.refine's fields) → a batched `refine.Refinement` (padding
  included), ready."""
  report = progress or (lambda stage: None)
  mask = models.shard(emb.dss.mask)
  kwargs = refine_kwargs(refine_config)
  tell = step_reporter(report, "refinement", kwargs["feature_steps"])
  last = [0]

  def step_done(k):
    # Under shard_map every device reports each step: show each k once. On
    # CPU the images of a batch are refined one after another
    # (`refine.map_images`), so k runs from 1 to steps once per image.
    if k != last[0]:
      last[0] = k
      tell(k)
  with refine_lib.on_step(step_done):
    result = _refine(models, emb.codes, emb.x, mask, kwargs)
    # Dispatch is asynchronous: wait inside the block so that every step
    # is reported while someone listens.
    jax.block_until_ready((result.synthesis, result.offset, result.image,
                           result.losses_in, result.losses_out))
  return result

