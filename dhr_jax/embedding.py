"""Optimisation-based GAN inversion: W / W+ codes by Adam on LPIPS (+ MSE).

This follows the optimisation embedding of the official DHR code base
(GANInverter `inference/optim_infer.py`), used both for the coarse inversion of
its domain-specific segmentation (40 steps in W) and for its 'optim'
embedding; that is rosinality's StyleGAN2 projector (`projector.py`) except
for how the generated image meets the target:

  * start from the mean latent: the generator checkpoint's `latent_avg`
    where the official code loads the generator from its StyleGAN2 weights
    (the 'optim' embedding, PTI's W pivot), the mean of mapping(z) over
    10,000 samples where it resumes from a trained checkpoint (DHR's coarse
    inversion, which runs beside the e4e encoder); see `latent_avg_or_mean`;
  * Adam on the latent and on the per-layer noise maps, learning rate
    lr·ramp(t) with t = step/steps, a cosine ramp-down over the last 25 % and a
    linear ramp-up over the first 5 %;
  * Gaussian noise of strength std_w · 0.05 · max(0, 1 − t/0.75)² added to the
    latent at every step (std_w = sqrt(Σ‖w − w̄‖²/n), the official spread);
  * loss LPIPS-VGG(ĝ, x) + 1e5·noise-regulariser + λ_mse·MSE at the
    resolution of the target x, which the official data set transform makes
    256² (a PIL bilinear resize of the input file, `io.resize_target`);
    ĝ is the generated image clamped to [−1, 1] and resized to the target's
    size by torch's `F.interpolate(mode='bilinear')` (align_corners=False,
    no antialiasing: at 1024→256 each output pixel averages a 2×2 subset of
    its 4×4 block), `ops.resize_generated`. rosinality's projector instead
    average-pools images larger than 256² (generated and target alike) and
    does not clamp: `resize='pool'`;
  * after every step each noise map is renormalised to zero mean, unit std.

The official loop computes a step's loss from the image it generates
and only then updates the latent: its DSS reads the last step's image (from
that step's latent and noise maps, before their update), and it returns the
codes after the last update. `EmbeddingResult` has both, `last_step_image`
and `codes`.

Every image is optimised on its own: the official script runs a batch with
one noise tensor per layer whose statistics (and the MSE mean) span the whole
batch, which couples the images. Here one image is exactly the official run
with batch 1, and a batch is those runs vmapped, so results do not depend on
which images share a batch.

The whole loop is one jitted `lax.scan`; with `progress` it reports every
finished step from inside it.
"""
import dataclasses
import functools
import itertools
import math
import threading
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from dhr_jax.models import ops
from dhr_jax.optim import adam

# GANInverter's data set transform resizes every input to 256² for the
# optimisation embedding's loss; rosinality's projector pools to at most 256².
LOSS_RES = 256
RESIZES = ("interpolate", "pool")


@dataclasses.dataclass(frozen=True)
class EmbeddingResult:
  """Output of `optimize_latent`.

  codes:  (B, n_latent, style_dim) W+ codes after the last update (W
          results repeated per layer), as the official code returns them.
  image:  (B, H, W, 3) the generator's image of `codes` with `noise`.
  noise:  list of (B, r, r, 1) optimised noise maps, one per layer.
  losses: (B, steps) total loss at every step (as optimised, i.e. with the
          step's latent noise).
  terms:  dict of (B, steps) arrays: 'lpips', 'noise' (regulariser, before
          its weight) and 'mse'.
  last_step_image: (B, H, W, 3) the image the last step generated and
          computed its loss from (its noisy latent, its noise maps), before
          that step's update; full resolution, not clamped. The official
          DSS compares this one with the input (`coarse_inversion`).
  """
  codes: Any
  image: Any
  noise: list
  losses: Any
  terms: dict
  last_step_image: Any = None


def latent_stats(G, key, n=10000):
  """(mean (style_dim,), spread scalar) of mapping(z) over n samples.

  The spread is the projector's sqrt(Σ_i ‖w_i − w̄‖² / n): the RMS distance to
  the mean, which scales the latent noise.
  """
  z = jax.random.normal(key, (n, G.z_dim))
  w = G.mapping(G.params, z)
  mean = jnp.mean(w, axis=0)
  std = jnp.sqrt(jnp.sum((w - mean) ** 2) / n)
  return mean, std


def learning_rates(steps, lr=0.1, rampdown=0.25, rampup=0.05):
  """Per-step learning rates of the projector (float32, (steps,))."""
  out = []
  for i in range(steps):
    t = i / steps
    ramp = min(1.0, (1.0 - t) / rampdown)
    ramp = 0.5 - 0.5 * math.cos(ramp * math.pi)
    ramp *= min(1.0, t / rampup) if rampup > 0 else 1.0
    out.append(lr * ramp)
  return np.asarray(out, np.float32)


def noise_levels(steps, noise=0.05, ramp=0.75):
  """Per-step latent-noise factor 0.05·max(0, 1 − t/0.75)², times std_w later."""
  t = np.arange(steps) / steps
  return np.asarray(noise * np.maximum(0.0, 1.0 - t / ramp) ** 2, np.float32)


def noise_regularizer(noise_maps):
  """Σ over maps and scales of the squared lag-1 autocorrelations.

  Each (N, r, r, 1) map is compared with itself shifted by one pixel along
  width and height (circularly), then 2×2-average-pooled and compared again
  until it is 8² or smaller; penalising the correlations keeps the noise maps
  from encoding image content.
  """
  loss = 0.0
  for n in noise_maps:
    while True:
      loss = loss + jnp.mean(n * jnp.roll(n, 1, axis=2)) ** 2
      loss = loss + jnp.mean(n * jnp.roll(n, 1, axis=1)) ** 2
      size = n.shape[1]
      if size <= 8:
        break
      n = n.reshape(n.shape[0], size // 2, 2, size // 2, 2, -1).mean((2, 4))
  return loss


def normalize_noise(n):
  """Zero mean, unit (unbiased) standard deviation, as torch's .std()."""
  n = n - jnp.mean(n)
  return n / jnp.sqrt(jnp.sum(n * n) / (n.size - 1))


def _box_pool(x, res):
  f = x.shape[1] // res
  if f == 1:
    return x
  b, h, w, c = x.shape
  return x.reshape(b, h // f, f, w // f, f, c).mean((2, 4))


def _to_loss_res(x, res):
  """Generator-sized images are average-pooled like the projector's output;
  other sizes are resized (antialiased bilinear, as PIL does)."""
  h, w = x.shape[1:3]
  if (h, w) == (res, res):
    return x
  if h == w and h % res == 0:
    return _box_pool(x, res)
  return jax.image.resize(x, (x.shape[0], res, res, x.shape[3]), "linear",
                          antialias=True)


def _draws(key, noise_shapes, latent_shape, steps):
  """One image's random numbers: initial noise maps and per-step latent
  noise (standard normal, scaled by the schedule later)."""
  k_noise, k_steps = jax.random.split(key)
  noise_keys = jax.random.split(k_noise, len(noise_shapes))
  noise0 = [jax.random.normal(k, s) for k, s in zip(noise_keys, noise_shapes)]
  eps = jax.vmap(lambda k: jax.random.normal(k, latent_shape))(
      jax.random.split(k_steps, steps))
  return noise0, eps


# --------------------------------------------------------------------------
# Progress: a host callback per step, only in a program that was asked for
# one. JAX does not write a program with host callbacks to its persistent
# compilation cache (`dhr_jax.compile_cache`), so without `progress` the
# loop is compiled without it and stays cacheable. A listener is found by
# its channel, a traced scalar: every caller shares one compiled program,
# and concurrent runs (the browser editor's threads) hear only their own.

_LISTENERS = {}
_CHANNELS = itertools.count()
_LISTENERS_LOCK = threading.Lock()


def _report_step(channel, step):
  fn = _LISTENERS.get(int(channel))
  if fn is not None:
    fn(int(step))


def _listen(progress):
  """Registers progress → its channel. Each step k is passed on once, in
  order: several devices (or a retried callback) may report a step twice."""
  last = [0]
  lock = threading.Lock()

  def heard(k):
    with lock:
      if k <= last[0]:
        return
      last[0] = k
    progress(k)
  with _LISTENERS_LOCK:
    channel = next(_CHANNELS) % 2**31
    _LISTENERS[channel] = heard
  return channel


def _unlisten(channel):
  with _LISTENERS_LOCK:
    _LISTENERS.pop(channel, None)


def _embed_one(G, L, target, noise0, eps, init, lrs, strengths, noise_weight,
               mse_weight, channel, *, space, resize):
  """One image: target (h, w, 3) at loss resolution; init (d,)|(n, d);
  noise0 [(1, r, r, 1)]; eps (steps, 1, d)|(steps, 1, n, d); channel: None
  (silent) or the listener's channel (int32 scalar)."""
  g_params, l_params = G.params, L.params
  n_latent = G.config["n_latent"]
  target = target[None]
  # The learning rate of step t is lrs[t] (the projector's ramps).
  opt = adam(lambda t: lrs[t])
  variables = (init[None], list(noise0))

  def render(latent, noise):
    wplus = latent[:, None] if space == "w" else latent
    wplus = jnp.broadcast_to(wplus, (1, n_latent, wplus.shape[-1]))
    return G.synthesis(g_params, wplus, noise=noise)

  def loss_fn(variables, e, strength):
    latent, noise = variables
    latent = latent + e * strength
    generated = render(latent, noise)
    img = (_box_pool(generated, target.shape[1]) if resize == "pool" else
           ops.resize_generated(generated, target.shape[1:3]))
    p = L.distance(l_params, img, target)[0]
    reg = noise_regularizer(noise)
    mse = jnp.mean((img - target) ** 2)
    return p + noise_weight * reg + mse_weight * mse, (p, reg, mse, generated)

  def step(carry, xs):
    variables, state, _ = carry
    strength, e = xs[:2]
    (loss, (p, reg, mse, generated)), grads = jax.value_and_grad(
        loss_fn, has_aux=True)(variables, e, strength)
    updates, state = opt.update(grads, state, variables)
    latent, noise = optax.apply_updates(variables, updates)
    variables = (latent, [normalize_noise(n) for n in noise])
    if channel is not None:
      # xs[2]: the step's number, 1-based (unbatched: one call per step).
      jax.debug.callback(_report_step, channel, xs[2])
    # Only the last step's image is kept (a carry, not a per-step output:
    # 40 full-size images would cost 500 MB at 1024²).
    return (variables, state, generated), (loss, p, reg, mse)

  first = jax.eval_shape(render, *variables)
  xs = (strengths, eps)
  if channel is not None:
    xs += (jnp.arange(1, strengths.shape[0] + 1, dtype=jnp.int32),)
  (variables, _, last_image), history = jax.lax.scan(
      step, (variables, opt.init(variables),
             jnp.zeros(first.shape, first.dtype)), xs)
  latent, noise = variables
  image = render(latent, noise)
  codes = jnp.broadcast_to(latent[:, None] if space == "w" else latent,
                           (1, n_latent, latent.shape[-1]))
  return (codes[0], image[0], [n[0] for n in noise], history,
          last_image[0])


@functools.partial(jax.jit, static_argnames=("space", "resize"))
def embed_batch(G, lpips, targets, noise0, eps, inits, lrs, strengths,
                noise_weight, mse_weight, channel=None, *, space, resize):
  """`optimize_latent`'s compiled optimisation of a batch from given random
  draws (`draw_batch`), without its float32 casts: public for bench/, which
  runs it in float64 from the float32 draws. channel: None (silent) or a
  progress listener's channel."""
  one = functools.partial(_embed_one, G, lpips, space=space, resize=resize)
  return jax.vmap(one, in_axes=(0, 0, 0, 0, None, None, None, None, None))(
      targets, noise0, eps, inits, lrs, strengths, noise_weight, mse_weight,
      channel)


@functools.partial(jax.jit, static_argnums=(1, 2, 3))
def draw_batch(keys, noise_shapes, latent_shape, steps):
  """The per-image random draws of `optimize_latent` (start noise, latent
  perturbations), apart so that bench/ can reuse them (`embed_batch`)."""
  return jax.vmap(lambda k: _draws(k, noise_shapes, latent_shape, steps))(
      keys)


def latent_avg_or_mean(G, w_stats):
  """Where the official optimisation embedding starts when it loads the
  generator from its StyleGAN2 weights: the checkpoint's `latent_avg`
  ((style_dim,); a (n_latent, style_dim) one is averaged over its rows).
  A checkpoint without one (e.g. a converted NVIDIA pickle has it, a bare
  state dict may not) starts from the sampled mean `w_stats[0]` instead,
  as the official code does when it resumes from a trained checkpoint."""
  if G.latent_avg is None:
    return jnp.asarray(w_stats[0], jnp.float32)
  avg = jnp.asarray(G.latent_avg, jnp.float32)
  return avg.mean(0) if avg.ndim == 2 else avg


def _is_key_batch(key):
  key = jnp.asarray(key) if not isinstance(key, jax.Array) else key
  if jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
    return key.ndim == 1
  return key.ndim == 2


def optimize_latent(G, target, lpips_vgg, *, key, steps, space="w", lr=0.1,
                    noise_regularize=1e5, mse_lambda=0.0, noise=0.05,
                    noise_ramp=0.75, lr_rampdown=0.25, lr_rampup=0.05,
                    w_stats=None, n_mean_latent=10000, init=None,
                    resize="interpolate", noise_init=None,
                    latent_noise=None, progress=None):
  """Embeds images in W or W+ of generator `G` by optimisation.

  Args:
    G: a generator (`load_generator` / `init_generator`).
    target: (B, h, w, 3) images in [-1, 1]. With resize='interpolate' (the
      DHR code's optimisation embedding) they are compared at their own
      size, the generated image clamped and bilinearly resized to it; pass
      `io.resize_target(images)` (256², as the official data set transform)
      to match the official runs. With resize='pool' (rosinality's
      projector) both are brought to min(generator size, 256)² (average-
      pooled when the side is a multiple of it, else resized).
    lpips_vgg: an LPIPS metric (`dhr_jax.models.lpips.load('vgg')`).
    key: one PRNG key, or B keys (one per image). With one key the mean
      latent is estimated from it too; with per-image keys pass `w_stats`.
    steps: number of Adam steps.
    space: 'w' (one latent repeated over layers) or 'w+'.
    lr, lr_rampdown, lr_rampup: peak learning rate and the fractions of the
      run spent ramping it down (cosine) and up (linear).
    noise_regularize: weight of `noise_regularizer`.
    mse_lambda: weight of the pixel MSE (0 = LPIPS only).
    noise, noise_ramp: latent-noise strength (× the latent spread) and the
      fraction of the run over which it decays quadratically to 0.
    w_stats: (mean (style_dim,), spread) from `latent_stats`, to reuse.
    n_mean_latent: samples for `latent_stats` when w_stats is None.
    init: optional starting codes, (B, style_dim) for 'w' or
      (B, n_latent, style_dim) for 'w+' (default: the mean latent).
    resize: 'interpolate' or 'pool', see `target`.
    noise_init, latent_noise: the random numbers of the run, to replay
      another run's (e.g. the official code's): the initial noise maps, a
      list of (B, r, r, 1) like `G.noise`, and the per-step standard normal
      latent noise, (B, steps, 1, style_dim) for 'w' or (B, steps, 1,
      n_latent, style_dim) for 'w+' (scaled by the schedule × spread).
      Default: drawn from the image's key.
    progress: optional `progress(k)`, told k = 1, ..., steps as each step
      finishes (once each, in order), from XLA's callback thread while the
      compiled loop runs; the call returns after the last. None compiles the
      loop without the callback (the one JAX's persistent cache can keep).

  Returns:
    EmbeddingResult (codes, image, noise, losses, terms, last_step_image).
  """
  if space not in ("w", "w+"):
    raise ValueError(f"space must be 'w' or 'w+', got {space!r}")
  if steps < 1:
    raise ValueError(f"steps must be >= 1, got {steps}")
  if resize not in RESIZES:
    raise ValueError(f"resize must be one of {RESIZES}, got {resize!r}")
  target = jnp.asarray(target, jnp.float32)
  if target.ndim != 4 or target.shape[-1] != 3:
    raise ValueError(f"target must be NHWC RGB (B, H, W, 3), got "
                     f"{target.shape}")
  b = target.shape[0]
  d, n_latent = G.config["style_dim"], G.config["n_latent"]
  if _is_key_batch(key):
    keys = key
    if keys.shape[0] != b:
      raise ValueError(f"got {keys.shape[0]} keys for {b} images")
    if w_stats is None:
      raise ValueError("with one key per image, pass w_stats="
                       "latent_stats(G, key) so every image starts alike")
  else:
    stats_key, images_key = jax.random.split(key)
    keys = jax.random.split(images_key, b)
    if w_stats is None:
      w_stats = latent_stats(G, stats_key, n_mean_latent)
  w_mean, w_std = w_stats
  if init is None:
    shape = (b, d) if space == "w" else (b, n_latent, d)
    init = jnp.broadcast_to(jnp.asarray(w_mean, jnp.float32), shape)
  else:
    init = jnp.asarray(init, jnp.float32)
    want = (b, d) if space == "w" else (b, n_latent, d)
    if init.shape != want:
      raise ValueError(f"init for space {space!r} must be {want}, got "
                       f"{init.shape}")
  targets = (_to_loss_res(target, min(G.config["size"], LOSS_RES))
             if resize == "pool" else target)
  lrs = jnp.asarray(learning_rates(steps, lr, lr_rampdown, lr_rampup))
  strengths = jnp.asarray(noise_levels(steps, noise, noise_ramp)) * w_std
  latent_shape = (1, d) if space == "w" else (1, n_latent, d)
  noise0, eps = draw_batch(keys, tuple(tuple(n.shape) for n in G.noise),
                           latent_shape, steps)
  if noise_init is not None:
    want = [(b,) + tuple(n.shape[1:]) for n in G.noise]
    got = [tuple(np.shape(n)) for n in noise_init]
    if got != want:
      raise ValueError(f"noise_init must have shapes {want}, got {got}")
    # Each image's maps keep the generator's batch axis of one.
    noise0 = [jnp.asarray(n, jnp.float32)[:, None] for n in noise_init]
  if latent_noise is not None:
    latent_noise = jnp.asarray(latent_noise, jnp.float32)
    if latent_noise.shape != eps.shape:
      raise ValueError(f"latent_noise must be {eps.shape}, got "
                       f"{latent_noise.shape}")
    eps = latent_noise
  channel = None if progress is None else _listen(progress)
  try:
    out = embed_batch(
        G, lpips_vgg, targets, noise0, eps, init, lrs, strengths,
        jnp.float32(noise_regularize), jnp.float32(mse_lambda),
        None if channel is None else np.int32(channel), space=space,
        resize=resize)
    if channel is not None:
      # Dispatch is asynchronous: every step is reported before the
      # listener goes.
      jax.block_until_ready(out)
  finally:
    if channel is not None:
      _unlisten(channel)
  codes, image, noise_maps, history, last_image = out
  losses, p, reg, mse = history
  return EmbeddingResult(codes=codes, image=image, noise=list(noise_maps),
                         losses=losses,
                         terms={"lpips": p, "noise": reg, "mse": mse},
                         last_step_image=last_image)


def coarse_inversion(G, target, lpips_vgg, *, key, steps=40, **kwargs):
  """The coarse inversion of DHR's domain-specific segmentation.

  A short W-space projection (40 steps by default) whose reconstruction is
  good enough to tell the in-domain regions (the generator can reproduce
  them) from the out-of-domain ones. `target` is the official code's 256²
  `io.resize_target` of the input; keyword arguments as `optimize_latent`.
  It starts from the sampled mean latent (the official DHR run resumes from
  the e4e checkpoint, so its optimisation does not use `latent_avg`).

  DSS compares `last_step_image` with the input, as the official code does
  (its LPIPS `delta` is taken from the last step's generated image, before
  that step's update); `codes` and `image` are after the update, as the
  official coarse inversion returns them.
  """
  return optimize_latent(G, target, lpips_vgg, key=key, steps=steps,
                         space="w", **kwargs)
