"""Hybrid Modulation Refinement: the second stage of DHR.

Given W+ codes of a (coarse) inversion, a target image and its
domain-specific mask m (1 = in-domain: what the generator can draw), DHR
refines two things at once, from one forward pass per step:

  * the generator weights θ, driven by the in-domain loss
    L_in = l2·MSE_m + lpips·LPIPS_m, for the first `weight_steps` steps;
  * a feature offset o at `feature_idx`, driven by the out-of-domain loss
    L_out = l2·MSE_(1−m) + lpips·LPIPS_(1−m), for all `feature_steps` steps.

The generator's feature f there is replaced by f·m_f + o·(1 − m_f), with m_f
the soft (area-averaged) mask at the feature resolution, and o starts at f,
so the first image is the generator's own. Details follow the official loop
(GANInverter `dhr_infer.py`, checked against its output in
tests/test_refine.py):

  * MSE_m = Σ(se·m)/Σm with se the squared error of every channel and m
    counted once per pixel (so it is 3× a per-element mean);
  * LPIPS-Alex per-layer maps are masked by m_f resized (torch "nearest") to
    each map's size, averaged over the mask, and summed over layers;
  * both gradients come from the same forward: ∂L_out/∂o and ∂L_in/∂θ (the
    offset step does not feed into the weights' gradient);
  * two Adam optimisers (β 0.9/0.999, ε 1e-8), lr 1.5e-3 for θ, 9e-2 for o;
    the weight optimiser only steps (and counts steps) during the first
    weight_steps steps.

Modes, from the same update with a fixed mask:
  * "hybrid"  — the mask given;
  * "weight"  — m = 1: PTI-like weight modulation, the offset is never seen
    (m_f = 1) and L_out is an empty mean;
  * "feature" — m = 0: feature modulation only, L_in is an empty mean.
An empty masked mean (Σm = 0) is defined as 0, with a zero gradient, so the
degenerate modes are exact: Adam with zero gradients moves nothing. The
update that would be exactly zero is skipped outright in those modes (no
weight backward pass in "feature" mode, no offset backward in "weight").

Only the synthesis weights are refined: with W+ codes the mapping network
gets no gradient (the official Adam holds it but never moves it).

Each image is refined on its own (`map_images`: in turn on CPU, vmapped
elsewhere) with its own copy of the weights and both optimiser states, and
the step loop is one `lax.scan`,
so a batch is one compiled program, cached per (architecture, shapes, mode,
feature_idx, step counts); learning rates and loss weights are traced and
changing them does not recompile. The schedule is two scans of the same
step: `weight_steps` steps that update both, then the rest compiled without
the weight update (so its backward pass is not paid for).

The result is a `Refinement` of B images (always batched): it carries the
refined weights, offset, mask, codes, noise, feature_idx and mode, so
`editing.render(G, refinement, codes)` renders it (and its edits) with
nothing to repeat; `refinement[i]` is image i (a batch of one), and
`save_refined` / `load_refined` store one image compactly.
"""
import contextlib
import dataclasses
import functools
import hashlib
import json
import math
from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import struct

from dhr_jax import checkpoint
from dhr_jax.models import lpips as lpips_lib
from dhr_jax.models import ops
from dhr_jax.models.frozen import FrozenConfig
from dhr_jax.models.stylegan2 import (Generator, complete_config,
                                      feature_resolution, noise_shapes)
from dhr_jax.optim import adam

MODES = ("hybrid", "weight", "feature")
MSE_NORMS = ("pixel", "element")
KIND = "refined"


# --------------------------------------------------------------------------
# The objective.


def masked_mean(x, m):
  """Σ(x·m)/Σm over all axes, m broadcast over x's channels; 0 if Σm = 0.

  The denominator counts m once per pixel (the official convention). When
  the mask is empty the numerator is an exact 0 and dividing by 1 instead
  keeps value and gradient at 0 (no 0/0 NaN).
  """
  den = jnp.sum(m)
  return jnp.sum(x * m) / jnp.where(den > 0, den, 1.0)


def area_pool(mask, res):
  """(B, H, W, 1) → (B, res, res, 1) block means (torch AdaptiveAvgPool2d
  when H, W are multiples of res, which generator sizes always are)."""
  b, h, w, c = mask.shape
  if h % res or w % res:
    raise ValueError(f"mask of size {h}×{w} cannot be pooled to {res}²")
  return mask.reshape(b, res, h // res, res, w // res, c).mean((2, 4))


def refinement_losses(image, target, mask, mask_feature, l2_lambda,
                      lpips_lambda, lpips_params=None, lpips_net=None,
                      mse_norm="pixel"):
  """(L_in, L_out) of one image batch (the official objective, see module doc).

  mask: full-resolution (binary) mask; mask_feature: its soft version at the
  feature resolution, which masks the LPIPS maps. LPIPS is left out
  entirely when `lpips_net` is None. mse_norm: 'pixel' divides the masked
  squared error by the masked pixel count (DHR), 'element' by the element
  count, channels included (PTI's F.mse_loss when m = 1).
  """
  se = (image - target) ** 2
  if mse_norm == "element":
    se = se / se.shape[-1]
  loss_in = l2_lambda * masked_mean(se, mask)
  loss_out = l2_lambda * masked_mean(se, 1.0 - mask)
  if lpips_net is not None:
    maps = lpips_lib.LPIPSNet(lpips_net).apply({"params": lpips_params},
                                               image, target)
    p_in = p_out = 0.0
    for d in maps:
      m_l = ops.resize_nearest(mask_feature, d.shape[1:3])
      p_in = p_in + masked_mean(d, m_l)
      p_out = p_out + masked_mean(d, 1.0 - m_l)
    loss_in = lpips_lambda * p_in + loss_in
    loss_out = lpips_lambda * p_out + loss_out
  return loss_in, loss_out


# --------------------------------------------------------------------------
# One step.


@dataclasses.dataclass(frozen=True)
class RefineSpec:
  """What a compiled refinement depends on besides array shapes (static).

  generator: the generator config (the architecture; the weights are traced
  arguments, so every generator of one architecture shares the compiled
  program). weights_frozen: compile the step without the weight update
  (the loop uses it once step ≥ weight_steps).
  """
  generator: FrozenConfig
  feature_idx: int
  mode: str = "hybrid"
  lpips_net: Optional[str] = None
  weights_frozen: bool = False
  mse_norm: str = "pixel"

  @property
  def train_weights(self):
    return self.mode != "feature" and not self.weights_frozen

  @property
  def train_offset(self):
    return self.mode != "weight"


def refine_spec(G, feature_idx, mode="hybrid", lpips_net=None,
                mse_norm="pixel"):
  """The RefineSpec of generator G (see `hybrid_step`)."""
  if mode not in MODES:
    raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
  if mse_norm not in MSE_NORMS:
    raise ValueError(f"mse_norm must be one of {MSE_NORMS}, got {mse_norm!r}")
  n = G.config["num_layers"]
  if not 0 <= int(feature_idx) < n:
    raise ValueError(f"feature_idx must be in [0, {n}) for a "
                     f"{G.config['size']}² generator, got {feature_idx}")
  return RefineSpec(G.config, int(feature_idx), mode, lpips_net,
                    mse_norm=mse_norm)


def _generator(spec):
  # Weights and noise are passed to synthesis explicitly; only the
  # architecture is needed.
  return Generator(spec.generator, None, None)


class RefineState(NamedTuple):
  """The refinement state of one image (a pytree).

  params: synthesis weights θ (params['synthesis'] of the generator);
  offset: (1, h, w, C) feature offset o; opt_params / opt_offset: the two
  Adam states; step: int32 count of steps taken.
  """
  step: Any
  params: Any
  offset: Any
  opt_params: Any
  opt_offset: Any


class RefineInputs(NamedTuple):
  """Fixed inputs of one image: codes (1, n_latent, d), target (1, H, W, 3),
  mask (1, H, W, 1), mask_feature (1, h, w, 1), noise (list of NHWC maps),
  lpips_params (None without LPIPS)."""
  codes: Any
  target: Any
  mask: Any
  mask_feature: Any
  noise: Any
  lpips_params: Any = None


class RefineHyper(NamedTuple):
  """Traced hyper-parameters (changing them does not recompile)."""
  weight_lr: Any
  feature_lr: Any
  l2_lambda: Any
  lpips_lambda: Any


def make_hyper(weight_lr=1.5e-3, feature_lr=9e-2, l2_lambda=1.0,
               lpips_lambda=1.0):
  return RefineHyper(jnp.float32(weight_lr), jnp.float32(feature_lr),
                     jnp.float32(l2_lambda), jnp.float32(lpips_lambda))


def _forward(spec, params, offset, inputs):
  """The image G(codes; θ, o, m_f) the losses compare with the target."""
  return _generator(spec).synthesis(
      {"synthesis": params}, inputs.codes, inputs.noise,
      feature_idx=spec.feature_idx, offset=offset, mask=inputs.mask_feature)


@functools.partial(jax.jit, static_argnums=0)
def init_state(spec, params, codes, noise):
  """Start of the refinement: θ as given, o = the generator's own feature
  at `feature_idx` for `codes` (1, n_latent, d), fresh Adam states."""
  _, feature = _generator(spec).synthesis(
      {"synthesis": params}, codes, noise, feature_idx=spec.feature_idx,
      return_feature=True)
  return RefineState(jnp.int32(0), params, feature, adam(0.0).init(params),
                     adam(0.0).init(feature))


def _adam_step(params, grads, opt_state, lr):
  updates, opt_state = adam(lr).update(grads, opt_state, params)
  return optax.apply_updates(params, updates), opt_state


@functools.partial(jax.jit, static_argnames=("spec",))
def hybrid_step(state, inputs, hyper, *, spec):
  """One DHR step: one forward, L_in and L_out, the offset's Adam update on
  ∂L_out/∂o and, unless `spec.weights_frozen` (or mode 'feature'), the
  weights' on ∂L_in/∂θ.

  Returns (new state, (L_in, L_out)) — the losses at the state passed in.
  The refinement loop runs it with the weights on for the first
  weight_steps steps and frozen afterwards.
  """
  image, back = jax.vjp(lambda p, o: _forward(spec, p, o, inputs),
                        state.params, state.offset)
  (loss_in, loss_out), loss_back = jax.vjp(
      lambda x: refinement_losses(x, inputs.target, inputs.mask,
                                  inputs.mask_feature, hyper.l2_lambda,
                                  hyper.lpips_lambda, inputs.lpips_params,
                                  spec.lpips_net, spec.mse_norm), image)
  one, zero = jnp.ones_like(loss_in), jnp.zeros_like(loss_in)

  offset, opt_offset = state.offset, state.opt_offset
  if spec.train_offset:
    g_offset = back(loss_back((zero, one))[0])[1]
    offset, opt_offset = _adam_step(offset, g_offset, opt_offset,
                                    hyper.feature_lr)

  params, opt_params = state.params, state.opt_params
  if spec.train_weights:
    g_params = back(loss_back((one, zero))[0])[0]
    params, opt_params = _adam_step(params, g_params, opt_params,
                                    hyper.weight_lr)

  new = RefineState(state.step + 1, params, offset, opt_params, opt_offset)
  return new, (loss_in, loss_out)


# --------------------------------------------------------------------------
# The loop, mapped over images.

# Who hears of every finished step (`on_step`). A registry, not an argument:
# the compiled loop always reports (one host callback of a scalar per step,
# nothing beside a step's forward and backward passes), so listening or not
# runs the same program.
_STEP_LISTENERS = []


def _report_step(step):
  for fn in tuple(_STEP_LISTENERS):
    fn(int(step))


@contextlib.contextmanager
def on_step(fn):
  """Calls `fn(k)` when refinements running inside the block finish step k.

  Called from XLA's callback thread, once per step (per device under
  shard_map); results are asynchronous, so block on them inside the block.
  """
  _STEP_LISTENERS.append(fn)
  try:
    yield
  finally:
    _STEP_LISTENERS.remove(fn)


def _refine_one(spec, feature_steps, weight_steps, params, codes, target,
                mask, noise, lpips_params, hyper):
  res = feature_resolution(spec.feature_idx)
  inputs = RefineInputs(codes[None], target[None], mask[None],
                        area_pool(mask[None], res), noise, lpips_params)
  state = init_state(spec, params, inputs.codes, noise)

  def step(state, spec):
    state, losses = hybrid_step(state, inputs, hyper, spec=spec)
    jax.debug.callback(_report_step, state.step)
    return state, losses

  def steps(state, spec, n):
    return jax.lax.scan(lambda s, _: step(s, spec), state, None, length=n)

  # Two scans of the same step, the second compiled without the weight
  # update: the weights' backward pass is only paid for the weight_steps
  # that use it. (Not one scan with lax.cond: on XLA CPU the backward pass
  # inside a conditional ran 5× slower, 64², 128 channels: 5.8 s vs 1.1 s
  # per step.)
  losses_in, losses_out = [], []
  if weight_steps:
    state, (l_in, l_out) = steps(state, spec, weight_steps)
    losses_in.append(l_in)
    losses_out.append(l_out)
  if feature_steps > weight_steps:
    frozen = dataclasses.replace(spec, weights_frozen=True)
    state, (_, l_out) = steps(state, frozen, feature_steps - weight_steps)
    losses_out.append(l_out)
  image = _forward(spec, state.params, state.offset, inputs)
  losses_in = (jnp.concatenate(losses_in) if losses_in
               else jnp.zeros((0,), jnp.float32))
  return (state.params, state.offset[0], inputs.mask_feature[0], image[0],
          losses_in, jnp.concatenate(losses_out))


def map_images(fn, *xs):
  """[fn(*x) for the images x of xs (arrays with a leading batch axis)].

  Every image has its own weights, so under vmap each convolution becomes a
  grouped one (a group per image), which XLA CPU runs as a naive loop (64²,
  batch 2: 49 s a weight step, one image ~8 s): on CPU the images are
  refined one after another, which also holds one image's activations at a
  time; other backends vmap them. Both give the same float32 gradients
  (64², LPIPS + MSE, first step: 3.7e-7 apart, equally far from float64);
  their final images may still differ by ~1e-3 (3.0e-3 there): the loop's
  discrete choices (a max-pool maximum in LPIPS, Adam's first ~lr·sign(g)
  steps) flip with rounding, and the official float32 loop is as far from
  float64 as either (README, "Differences from the official code";
  bench/float_precision.py --part refine_map).
  """
  if jax.default_backend() == "cpu":
    return jax.lax.map(lambda x: fn(*x), xs)
  return jax.vmap(fn)(*xs)


@functools.partial(jax.jit, static_argnames=("spec", "feature_steps",
                                             "weight_steps"))
def compiled_refinement(spec, feature_steps, weight_steps, params, codes,
                        target, mask, noise, lpips_params, hyper):
  """`hybrid_refine`'s compiled loop on prepared inputs, without its checks
  and float32 casts: public for bench/, which lowers it to time compilation
  and runs it in float64. Returns (synthesis params, offset, mask_feature,
  image, losses_in, losses_out), batched."""
  one = lambda c, t, m: _refine_one(spec, feature_steps, weight_steps, params,
                                    c, t, m, noise, lpips_params, hyper)
  return map_images(one, codes, target, mask)


@struct.dataclass
class Refinement:
  """Refined inversions of B images (always batched), as a pytree.

  synthesis:    per-image refined synthesis weights θ*: params['synthesis']
                of the generator with a leading B axis on every leaf;
  mapping:      the generator's mapping params, shared (never refined);
  codes:        (B, n_latent, style_dim) W+ codes that were refined;
  offset:       (B, h, w, C) feature offsets o at `feature_idx`;
  mask_feature: (B, h, w, 1) soft in-domain masks m_f blending the feature
                as f·m_f + o·(1 − m_f);
  noise:        list of NHWC noise maps, each (1, r, r, 1) shared by every
                image or (B, r, r, 1) one per image;
  feature_idx, mode: where the offset acts and how it was refined (static);
  image:        (B, H, W, 3) final images G(codes; θ*, o, m_f), or None
                (not stored by `save_refined`);
  losses_in, losses_out: (B, weight_steps), (B, feature_steps) or None.

  `editing.render(G, r, codes)` renders it; `r[i]` is image i as a batch of
  one; `r.params` is the full generator params per image (the mapping
  broadcast to B copies on access — rendering never needs it).
  """
  synthesis: Any
  mapping: Any
  codes: Any
  offset: Any
  mask_feature: Any
  noise: Any
  feature_idx: int = struct.field(pytree_node=False)
  mode: str = struct.field(pytree_node=False, default="hybrid")
  image: Any = None
  losses_in: Any = None
  losses_out: Any = None

  @property
  def params(self):
    b = self.batch_size
    return {"mapping": jax.tree_util.tree_map(
        lambda x: jnp.broadcast_to(x, (b,) + jnp.shape(x)), self.mapping),
            "synthesis": self.synthesis}

  @property
  def batch_size(self):
    return int(self.codes.shape[0])

  def __len__(self):
    return self.batch_size

  def take(self, i):
    """Image i as a Refinement of one image (arrays sliced, not copied to
    the host; shared noise stays shared)."""
    b = self.batch_size
    if not -b <= i < b:
      raise IndexError(f"image {i} of a refinement of {b}")
    i = int(i) % b
    one = lambda x: None if x is None else x[i:i + 1]
    noise = [n if n.shape[0] == 1 else n[i:i + 1] for n in self.noise]
    return self.replace(
        synthesis=jax.tree_util.tree_map(one, self.synthesis),
        codes=one(self.codes), offset=one(self.offset),
        mask_feature=one(self.mask_feature), noise=noise,
        image=one(self.image), losses_in=one(self.losses_in),
        losses_out=one(self.losses_out))

  __getitem__ = take


def _check_inputs(G, codes, target, mask, noise, mode):
  size, n, d = G.config["size"], G.n_latent, G.config["style_dim"]
  if codes.ndim != 3 or codes.shape[1:] != (n, d):
    raise ValueError(f"codes must be W+ (B, {n}, {d}) for this generator, "
                     f"got {codes.shape}")
  b = codes.shape[0]
  if target.shape != (b, size, size, 3):
    raise ValueError(f"target must be (B, H, W, 3) = ({b}, {size}, {size}, 3) "
                     f"(NHWC in [-1, 1] at the generator's size, one per "
                     f"code), got {target.shape}")
  if mask is None:
    if mode == "hybrid":
      raise ValueError("mode 'hybrid' needs a mask (B, H, W, 1), 1 = "
                       "in-domain; use mode='weight' or 'feature' without one")
  elif mask.shape != (b, size, size, 1):
    raise ValueError(f"mask must be (B, H, W, 1) = ({b}, {size}, {size}, 1) "
                     f"with 1 = in-domain, got {mask.shape}")
  want = noise_shapes(G.config)
  got = [tuple(x.shape) for x in noise]
  if got != [tuple(s) for s in want]:
    raise ValueError(f"noise must be {len(want)} maps of shapes {want} (the "
                     f"generator's own G.noise), got {got}")


def default_feature_idx(size):
  """The paper's feature: the second one at size/8 (11 at 1024², 7 at 256²)."""
  return 2 * int(math.log2(size // 32)) + 1


def hybrid_refine(G, codes, target, mask=None, *, noise=None,
                  feature_idx=None, feature_steps=100, weight_steps=50,
                  weight_lr=1.5e-3, feature_lr=9e-2, l2_lambda=1.0,
                  lpips_lambda=1.0, mode="hybrid", lpips_alex=None,
                  mse_norm="pixel"):
  """Refines W+ inversions of `target` by DHR's hybrid modulation.

  Args:
    G: the generator (`load_generator` / `init_generator`).
    codes: (B, n_latent, style_dim) W+ codes of the embedding (e4e, the
      optimisation, PTI's pivot).
    target: (B, H, W, 3) images in [-1, 1] at the generator's size.
    mask: (B, H, W, 1) binary domain-specific mask, 1 = in-domain. Ignored
      (may be None) in modes 'weight' (m = 1) and 'feature' (m = 0).
    noise: the generator's noise maps (default `G.noise`), shared by all
      images.
    feature_idx: where the offset acts; None = the paper's choice, the
      feature at 1/8 of the image side (`default_feature_idx`: 11 = 128²
      for a 1024² generator). The result records it.
    feature_steps: steps in all (the offset moves at every one).
    weight_steps: the first steps that also update the weights
      (≤ feature_steps).
    weight_lr, feature_lr: Adam learning rates of θ and o.
    l2_lambda, lpips_lambda: weights of MSE and LPIPS-Alex in both losses;
      with lpips_lambda = 0 LPIPS is not evaluated and needs no weights.
    mode: 'hybrid', 'weight' or 'feature' (see the module doc).
    lpips_alex: an LPIPS metric (`dhr_jax.models.lpips.load('alex')`), loaded
      when None and needed.
    mse_norm: 'pixel' (DHR's masked mean, see the module doc) or 'element'
      (a per-element mean: PTI's loss, configs/pti.py).

  Returns:
    A `Refinement` of the B images; `editing.render(G, result, codes)`
    renders it (and edits of it).
  """
  if mode not in MODES:
    raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
  if feature_steps < 1 or not 0 <= weight_steps <= feature_steps:
    raise ValueError(f"need feature_steps ≥ 1 and 0 ≤ weight_steps ≤ "
                     f"feature_steps (weights only update during the first "
                     f"weight_steps of the feature steps), got "
                     f"feature_steps={feature_steps}, "
                     f"weight_steps={weight_steps}")
  if feature_idx is None:
    feature_idx = default_feature_idx(G.config["size"])
  noise = list(G.noise if noise is None else noise)
  codes = jnp.asarray(codes, jnp.float32)
  target = jnp.asarray(target, jnp.float32)
  mask = None if mask is None else jnp.asarray(mask, jnp.float32)
  _check_inputs(G, codes, target, mask, noise, mode)
  if mode == "weight":
    mask = jnp.ones(target.shape[:3] + (1,), jnp.float32)
  elif mode == "feature":
    mask = jnp.zeros(target.shape[:3] + (1,), jnp.float32)

  lpips_net, lpips_params = None, None
  if lpips_lambda != 0:
    if lpips_alex is None:
      lpips_alex = lpips_lib.load("alex")
    lpips_net, lpips_params = lpips_alex.net, lpips_alex.params
  spec = refine_spec(G, feature_idx, mode, lpips_net, mse_norm)
  hyper = make_hyper(weight_lr, feature_lr, l2_lambda, lpips_lambda)
  (params, offset, mask_feature, image, losses_in,
   losses_out) = compiled_refinement(
       spec, int(feature_steps), int(weight_steps), G.params["synthesis"],
       codes, target, mask, noise, lpips_params, hyper)
  return Refinement(synthesis=params, mapping=G.params["mapping"],
                    codes=codes, offset=offset, mask_feature=mask_feature,
                    noise=noise, feature_idx=int(feature_idx), mode=mode,
                    image=image, losses_in=losses_in, losses_out=losses_out)


# --------------------------------------------------------------------------
# Saving and loading.


def _leaves(tree):
  return [(jax.tree_util.keystr(p), np.asarray(x, np.float32))
          for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]]


def params_digest(params):
  """sha256 of a params tree (names, shapes and bytes), to tell generators
  apart when a weight delta is applied."""
  h = hashlib.sha256()
  for name, x in _leaves(params):
    h.update(name.encode())
    h.update(str(x.shape).encode())
    h.update(np.ascontiguousarray(x).tobytes())
  return h.hexdigest()


def split_delta(refined, base):
  """refined − base as float32 plus the few exact values it cannot restore.

  fl(base + fl(refined − base)) is not always refined (e.g. when a weight
  crosses zero its difference loses low bits), so the elements where it
  fails are kept verbatim: returns (delta, {'index': int64, 'value': f32}
  or None), and `apply_delta` reproduces `refined` bit for bit.
  """
  refined = np.asarray(refined, np.float32)
  base = np.asarray(base, np.float32)
  delta = refined - base
  bad = np.flatnonzero((base + delta).view(np.uint32).ravel()
                       != refined.view(np.uint32).ravel())
  fix = None
  if bad.size:
    fix = {"index": bad.astype(np.int64), "value": refined.ravel()[bad]}
  return delta, fix


def apply_delta(base, delta, fix=None):
  """Inverse of `split_delta` (numpy float32, bit-exact)."""
  out = np.asarray(base, np.float32) + np.asarray(delta, np.float32)
  if fix is not None:
    out = out.ravel()
    out[np.asarray(fix["index"])] = np.asarray(fix["value"], np.float32)
    out = out.reshape(np.shape(base))
  return out


def _noise_equal(a, b):
  return len(a) == len(b) and all(
      np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(a, b))


def save_refined(directory, refinement, G, index=0, *, overwrite=False):
  """Writes image `index` of a `Refinement` compactly under `directory`.

  Stored: the synthesis weight delta θ* − θ (the mapping never changes), the
  offset, the soft mask, the codes, feature_idx and mode, plus the digest
  of θ so the delta is only ever applied to the generator it came from.
  Noise maps are stored only if they are not G.noise. `load_refined(dir, G)`
  gives a Refinement of one image that renders the identical image.
  """
  item = refinement.take(index)
  base = dict(_leaves(G.params["synthesis"]))
  deltas, fixes = {}, {}
  for name, x in _leaves(item.synthesis):
    deltas[name], fix = split_delta(x[0], base[name])
    if fix is not None:
      fixes[name] = fix
  # Plain string keys (no '/', no odd characters): leaves by position.
  names = sorted(deltas)
  tree = {
      "delta": {str(i): deltas[n] for i, n in enumerate(names)},
      "offset": np.asarray(item.offset[0]),
      "mask_feature": np.asarray(item.mask_feature[0]),
      "codes": np.asarray(item.codes[0]),
  }
  if fixes:
    tree["exact"] = {str(names.index(n)): f for n, f in fixes.items()}
  own_noise = _noise_equal(item.noise, G.noise)
  if not own_noise:
    tree["noise"] = {str(i): np.asarray(x) for i, x in enumerate(item.noise)}
  config = {
      "feature_idx": int(item.feature_idx), "mode": item.mode,
      "generator": G.config, "base_digest": params_digest(G.params["synthesis"]),
      "leaves": names, "n_exact": int(sum(f["index"].size
                                          for f in fixes.values())),
      "noise": "generator" if own_noise else "stored",
  }
  # local: every process of a multi-process run writes its own images.
  return checkpoint.save(directory, tree, KIND, config, overwrite=overwrite,
                         local=True)


def load_refined(directory, G):
  """Reads a `save_refined` directory back for generator G → a `Refinement`
  of one image (no image or losses)."""
  tree, config = checkpoint.load(directory, KIND)
  same = lambda c: json.dumps(complete_config(c), sort_keys=True)
  if same(config["generator"]) != same(G.config):
    raise checkpoint.CheckpointError(
        f"{directory} was refined on a generator with config "
        f"{config['generator']}, not this one ({dict(G.config)}); load it "
        "with the generator it was refined from.")
  if params_digest(G.params["synthesis"]) != config["base_digest"]:
    raise checkpoint.CheckpointError(
        f"{directory} stores a weight delta for other generator weights "
        "(digest mismatch); load it with the exact generator checkpoint it "
        "was refined from.")
  names = config["leaves"]
  exact = tree.get("exact", {})
  leaves = jax.tree_util.tree_flatten_with_path(G.params["synthesis"])[0]
  by_name = {n: i for i, n in enumerate(names)}
  out = []
  for path, base in leaves:
    i = str(by_name[jax.tree_util.keystr(path)])
    out.append(jnp.asarray(apply_delta(base, tree["delta"][i],
                                       exact.get(i)))[None])
  synthesis = jax.tree_util.tree_unflatten(
      jax.tree_util.tree_structure(G.params["synthesis"]), out)
  if "noise" in tree:
    noise = [tree["noise"][str(i)] for i in range(len(tree["noise"]))]
  else:
    noise = list(G.noise)
  return Refinement(synthesis=synthesis, mapping=G.params["mapping"],
                    codes=tree["codes"][None], offset=tree["offset"][None],
                    mask_feature=tree["mask_feature"][None], noise=noise,
                    feature_idx=int(config["feature_idx"]),
                    mode=config["mode"])
