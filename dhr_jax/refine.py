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
    the weight optimiser only steps (and counts steps) while step <
    weight_steps.

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

Each image is refined on its own: `vmap` gives every image its own copy of
the weights and both optimiser states, and the step loop is one `lax.scan`,
so a batch is one compiled program, cached per (architecture, shapes, mode,
feature_idx, step counts); learning rates and loss weights are traced and
changing them does not recompile.
"""
import dataclasses
import functools
import hashlib
import json
from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax

from dhr_jax import checkpoint
from dhr_jax.models.stylegan2 import (Generator, feature_resolution,
                                      noise_shapes)

MODES = ("hybrid", "weight", "feature")
MSE_NORMS = ("pixel", "element")
KIND = "refined"

# Torch Adam defaults, as the official loop uses them.
_ADAM = optax.scale_by_adam(b1=0.9, b2=0.999, eps=1e-8)


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


def nearest_indices(n_in, n_out):
  """Source rows of torch's legacy `interpolate(mode='nearest')`:
  floor(i · (n_in / n_out)) in float32, clipped to n_in − 1."""
  scale = np.float32(n_in) / np.float32(n_out)
  idx = np.floor(np.arange(n_out, dtype=np.float32) * scale).astype(np.int64)
  return np.minimum(idx, n_in - 1)


def resize_nearest(x, size):
  """(B, h, w, C) → (B, *size, C) picking pixels as torch 'nearest' does."""
  rows = nearest_indices(x.shape[1], size[0])
  cols = nearest_indices(x.shape[2], size[1])
  return x[:, rows][:, :, cols]


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
    maps = _lpips_module(lpips_net).apply({"params": lpips_params}, image,
                                          target)
    p_in = p_out = 0.0
    for d in maps:
      m_l = resize_nearest(mask_feature, d.shape[1:3])
      p_in = p_in + masked_mean(d, m_l)
      p_out = p_out + masked_mean(d, 1.0 - m_l)
    loss_in = lpips_lambda * p_in + loss_in
    loss_out = lpips_lambda * p_out + loss_out
  return loss_in, loss_out


@functools.lru_cache(maxsize=None)
def _lpips_module(net):
  from dhr_jax.lpips import LPIPSNet
  return LPIPSNet(net)


# --------------------------------------------------------------------------
# One step.


@dataclasses.dataclass(frozen=True)
class RefineSpec:
  """What a compiled refinement depends on besides array shapes (static).

  generator: the generator config as canonical JSON (the architecture; the
  weights are traced arguments, so every generator of one architecture
  shares the compiled program). weights_frozen: compile the step without
  the weight update (the loop uses it once step ≥ weight_steps).
  """
  generator: str
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


def refine_spec(G, feature_idx=11, mode="hybrid", lpips_net=None,
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
  return RefineSpec(json.dumps(G.config, sort_keys=True), int(feature_idx),
                    mode, lpips_net, mse_norm=mse_norm)


@functools.lru_cache(maxsize=None)
def _generator(config_json):
  # Weights and noise are passed to synthesis explicitly; only the module
  # structure (from the config) is needed.
  return Generator(json.loads(config_json), None, None)


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
  weight_steps: Any
  weight_lr: Any
  feature_lr: Any
  l2_lambda: Any
  lpips_lambda: Any


def make_hyper(weight_steps=50, weight_lr=1.5e-3, feature_lr=9e-2,
               l2_lambda=1.0, lpips_lambda=1.0):
  return RefineHyper(jnp.int32(weight_steps), jnp.float32(weight_lr),
                     jnp.float32(feature_lr), jnp.float32(l2_lambda),
                     jnp.float32(lpips_lambda))


def _render(spec, params, offset, inputs):
  G = _generator(spec.generator)
  return G.synthesis({"synthesis": params}, inputs.codes, inputs.noise,
                     feature_idx=spec.feature_idx, offset=offset,
                     mask=inputs.mask_feature)


@functools.partial(jax.jit, static_argnums=0)
def init_state(spec, params, codes, noise):
  """Start of the refinement: θ as given, o = the generator's own feature
  at `feature_idx` for `codes` (1, n_latent, d), fresh Adam states."""
  G = _generator(spec.generator)
  _, feature = G.synthesis({"synthesis": params}, codes, noise,
                           feature_idx=spec.feature_idx, return_feature=True)
  return RefineState(jnp.int32(0), params, feature, _ADAM.init(params),
                     _ADAM.init(feature))


def _adam_apply(params, grads, opt_state, lr):
  updates, opt_state = _ADAM.update(grads, opt_state)
  params = jax.tree_util.tree_map(lambda p, u: p - lr * u, params, updates)
  return params, opt_state


@functools.partial(jax.jit, static_argnames=("spec",))
def hybrid_step(state, inputs, hyper, *, spec):
  """One DHR step: one forward, L_in and L_out, the offset's Adam update on
  ∂L_out/∂o and, while step < weight_steps, the weights' on ∂L_in/∂θ.

  Returns (new state, (L_in, L_out)) — the losses at the state passed in.
  The weight update is computed every step and kept only while the traced
  step < weight_steps (weights and their Adam state stay bit-identical
  afterwards), so one program serves every weight_steps.
  """
  image, back = jax.vjp(lambda p, o: _render(spec, p, o, inputs),
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
    offset, opt_offset = _adam_apply(offset, g_offset, opt_offset,
                                     hyper.feature_lr)

  params, opt_params = state.params, state.opt_params
  if spec.train_weights:
    g_params = back(loss_back((one, zero))[0])[0]
    new_params, new_opt = _adam_apply(params, g_params, opt_params,
                                      hyper.weight_lr)
    # Masked rather than lax.cond: on XLA CPU the backward pass inside a
    # conditional ran 5× slower than unconditionally (64², 128 channels:
    # 5.8 s vs 1.1 s per step), more than the steps it would skip.
    on = state.step < hyper.weight_steps
    keep = lambda new, old: jax.tree_util.tree_map(
        lambda a, b: jnp.where(on, a, b), new, old)
    params, opt_params = keep(new_params, params), keep(new_opt, opt_params)

  new = RefineState(state.step + 1, params, offset, opt_params, opt_offset)
  return new, (loss_in, loss_out)


# --------------------------------------------------------------------------
# The loop, vmapped over images.


def _refine_one(spec, feature_steps, weight_steps, params, codes, target,
                mask, noise, lpips_params, hyper):
  res = feature_resolution(spec.feature_idx)
  inputs = RefineInputs(codes[None], target[None], mask[None],
                        area_pool(mask[None], res), noise, lpips_params)
  state = init_state(spec, params, inputs.codes, noise)

  def steps(state, spec, n):
    return jax.lax.scan(lambda s, _: hybrid_step(s, inputs, hyper, spec=spec),
                        state, None, length=n)

  # Two scans of the same step: the second is compiled without the weight
  # update, which the gate would discard anyway, so the weights' backward
  # pass is only paid for the weight_steps that use it.
  losses_in, losses_out = [], []
  if weight_steps:
    state, (l_in, l_out) = steps(state, spec, weight_steps)
    losses_in.append(l_in)
    losses_out.append(l_out)
  if feature_steps > weight_steps:
    frozen = dataclasses.replace(spec, weights_frozen=True)
    state, (_, l_out) = steps(state, frozen, feature_steps - weight_steps)
    losses_out.append(l_out)
  image = _render(spec, state.params, state.offset, inputs)
  losses_in = (jnp.concatenate(losses_in) if losses_in
               else jnp.zeros((0,), jnp.float32))
  return (state.params, state.offset[0], inputs.mask_feature[0], image[0],
          losses_in, jnp.concatenate(losses_out))


@functools.partial(jax.jit, static_argnames=("spec", "feature_steps",
                                             "weight_steps"))
def _refine_batch(spec, feature_steps, weight_steps, params, codes, target,
                  mask, noise, lpips_params, hyper):
  one = functools.partial(_refine_one, spec, feature_steps, weight_steps)
  return jax.vmap(one, in_axes=(None, 0, 0, 0, None, None, None))(
      params, codes, target, mask, noise, lpips_params, hyper)


class Refined(NamedTuple):
  """One refined inversion, ready for `G.synthesis` (batch of one):

      G.synthesis(r.params, r.codes, r.noise, feature_idx=r.feature_idx,
                  offset=r.offset, mask=r.mask_feature)

  params: full generator params θ*; codes (1, n_latent, d); offset
  (1, h, w, C); mask_feature (1, h, w, 1); noise: list of NHWC maps.
  """
  params: Any
  codes: Any
  offset: Any
  mask_feature: Any
  feature_idx: int
  noise: Any
  mode: str = "hybrid"

  def synthesize(self, G, codes=None):
    """The image of these (or edited) codes with θ*, o and m_f."""
    codes = self.codes if codes is None else codes
    return G.synthesis(self.params, codes, self.noise,
                       feature_idx=self.feature_idx, offset=self.offset,
                       mask=self.mask_feature)


@dataclasses.dataclass(frozen=True)
class RefineResult:
  """Output of `hybrid_refine` for B images.

  params:       refined generator params, every leaf with a leading B axis
                (mapping copied unchanged);
  offset:       (B, h, w, C) feature offsets o;
  mask_feature: (B, h, w, 1) soft masks m_f used in the blend;
  image:        (B, H, W, 3) final images G(codes; θ*, o, m_f);
  losses_in:    (B, weight_steps) L_in at every weight step;
  losses_out:   (B, feature_steps) L_out at every step;
  codes, feature_idx, mode, noise: what produced them.
  """
  params: Any
  offset: Any
  mask_feature: Any
  image: Any
  losses_in: Any
  losses_out: Any
  codes: Any
  feature_idx: int
  mode: str
  noise: Any

  def select(self, i):
    """Image i as a `Refined` (batch of one) for `G.synthesis`."""
    return Refined(
        params=jax.tree_util.tree_map(lambda x: x[i], self.params),
        codes=self.codes[i:i + 1], offset=self.offset[i:i + 1],
        mask_feature=self.mask_feature[i:i + 1],
        feature_idx=self.feature_idx, noise=self.noise, mode=self.mode)


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


def hybrid_refine(G, codes, target, mask=None, *, noise=None, feature_idx=11,
                  feature_steps=100, weight_steps=50, weight_lr=1.5e-3,
                  feature_lr=9e-2, l2_lambda=1.0, lpips_lambda=1.0,
                  mode="hybrid", lpips_alex=None, mse_norm="pixel"):
  """Refines W+ inversions of `target` by DHR's hybrid modulation.

  Args:
    G: the generator (`load_generator` / `init_generator`).
    codes: (B, n_latent, style_dim) W+ codes of the coarse inversion.
    target: (B, H, W, 3) images in [-1, 1] at the generator's size.
    mask: (B, H, W, 1) binary domain-specific mask, 1 = in-domain. Ignored
      (may be None) in modes 'weight' (m = 1) and 'feature' (m = 0).
    noise: the generator's noise maps (default `G.noise`), shared by all
      images.
    feature_idx: where the offset acts (11 = 128² for a 1024² generator).
    feature_steps: steps in all (the offset moves at every one).
    weight_steps: the first steps that also update the weights
      (≤ feature_steps).
    weight_lr, feature_lr: Adam learning rates of θ and o.
    l2_lambda, lpips_lambda: weights of MSE and LPIPS-Alex in both losses;
      with lpips_lambda = 0 LPIPS is not evaluated and needs no weights.
    mode: 'hybrid', 'weight' or 'feature' (see the module doc).
    lpips_alex: an LPIPS metric (`dhr_jax.lpips.load('alex')`), loaded
      when None and needed.
    mse_norm: 'pixel' (DHR's masked mean, see the module doc) or 'element'
      (a per-element mean: PTI's loss, configs/pti.py).

  Returns:
    RefineResult; `result.select(i)` renders image i with `G.synthesis`.
  """
  if mode not in MODES:
    raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
  if feature_steps < 1 or not 0 <= weight_steps <= feature_steps:
    raise ValueError(f"need feature_steps ≥ 1 and 0 ≤ weight_steps ≤ "
                     f"feature_steps (weights only update during the first "
                     f"weight_steps of the feature steps), got "
                     f"feature_steps={feature_steps}, "
                     f"weight_steps={weight_steps}")
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
      from dhr_jax import lpips
      lpips_alex = lpips.load("alex")
    lpips_net, lpips_params = lpips_alex.net, lpips_alex.params
  spec = refine_spec(G, feature_idx, mode, lpips_net, mse_norm)
  hyper = make_hyper(weight_steps, weight_lr, feature_lr, l2_lambda,
                     lpips_lambda)
  params, offset, mask_feature, image, losses_in, losses_out = _refine_batch(
      spec, int(feature_steps), int(weight_steps), G.params["synthesis"],
      codes, target, mask,
      noise, lpips_params, hyper)
  b = codes.shape[0]
  full = {
      "mapping": jax.tree_util.tree_map(
          lambda x: jnp.broadcast_to(x, (b,) + x.shape), G.params["mapping"]),
      "synthesis": params,
  }
  return RefineResult(params=full, offset=offset, mask_feature=mask_feature,
                      image=image, losses_in=losses_in,
                      losses_out=losses_out, codes=codes,
                      feature_idx=int(feature_idx), mode=mode, noise=noise)


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


def save_refined(directory, result, G, index=0, *, overwrite=False):
  """Writes image `index` of a RefineResult compactly under `directory`.

  Stored: the synthesis weight delta θ* − θ (the mapping never changes), the
  offset, the soft mask, the codes, feature_idx and mode, plus the digest
  of θ so the delta is only ever applied to the generator it came from.
  Noise maps are stored only if they are not G.noise. `load_refined(dir, G)`
  renders the identical image.
  """
  item = result.select(index) if isinstance(result, RefineResult) else result
  base = dict(_leaves(G.params["synthesis"]))
  deltas, fixes = {}, {}
  for name, x in _leaves(item.params["synthesis"]):
    deltas[name], fix = split_delta(x, base[name])
    if fix is not None:
      fixes[name] = fix
  # orbax wants string keys without odd characters: index leaves by position.
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
  return checkpoint.save(directory, tree, KIND, config, overwrite=overwrite)


def load_refined(directory, G):
  """Reads a `save_refined` directory back for generator G → `Refined`."""
  tree, config = checkpoint.load(directory, KIND)
  if json.dumps(config["generator"], sort_keys=True) != json.dumps(
      G.config, sort_keys=True):
    raise checkpoint.CheckpointError(
        f"{directory} was refined on a generator with config "
        f"{config['generator']}, not this one ({G.config}); load it with the "
        "generator it was refined from.")
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
                                       exact.get(i))))
  synthesis = jax.tree_util.tree_unflatten(
      jax.tree_util.tree_structure(G.params["synthesis"]), out)
  if "noise" in tree:
    noise = [tree["noise"][str(i)] for i in range(len(tree["noise"]))]
  else:
    noise = list(G.noise)
  return Refined(params={"mapping": G.params["mapping"],
                         "synthesis": synthesis},
                 codes=tree["codes"][None], offset=tree["offset"][None],
                 mask_feature=tree["mask_feature"][None],
                 feature_idx=int(config["feature_idx"]), noise=noise,
                 mode=config["mode"])
