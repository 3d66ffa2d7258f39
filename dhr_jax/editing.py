"""Editing refined inversions: InterFaceGAN directions and GANSpace components.

DHR's point is that a refined inversion stays editable: the edit moves the W+
codes, and the image is rendered with the *refined* generator weights, the
same feature offset and the same feature mask as the inversion itself. So an
edit of strength 0 gives back the inversion, and the out-of-domain region
(where the mask is 0) keeps the offset's content under every edit.

Codes are W+ arrays (B, n_latent, style_dim). Editing functions return one
code per image and per edit, (B, S, n_latent, style_dim), which `render`
turns into (B, S, H, W, 3) images.

InterFaceGAN (Shen et al., 2020): a direction n is a W-space normal of a
linear attribute boundary; an edit of strength α is w + α·n. Files as
distributed with GAN-inversion code (e4e, HFGI, PTI: age.pt, smile.pt,
pose.pt) are PyTorch tensors of shape (1, 512) or (1, 18, 512); InterFaceGAN's
own boundaries are .npy arrays of shape (1, 512) (`dhr_jax.directions` reads
them). Directions are used as given (not renormalised), so α is in the
file's units.

GANSpace (Härkönen et al., 2020): PCA of W = mapping(z). Component c is a unit
vector v_c with standard deviation σ_c of the W samples along it. The paper's
layer-wise edit E(v_c, first-last) of strength s moves the codes of the layers
`first:last` (half-open, as in the GANSpace and e4e code; the paper's
"E(v_54, 7-8)" is layer 7 only):

    mode="add" (GANSpace):  w_l ← w_l + s·σ_c·v_c          for first ≤ l < last

e4e / HFGI ship the same components (`ffhq_pca.pt`) with another meaning of
s, a target coordinate rather than a step:

    mode="set" (e4e):       w_l ← w_l + (s − t)·σ_c·v_c,   t = ⟨w_0 − μ, v_c⟩ / σ_c

with t measured on layer 0 of each code, as e4e's `editings/ganspace.py`
does; for W codes (all layers equal) this puts the edited layers at s
standard deviations along v_c.
"""
import functools
import os

import jax
import jax.numpy as jnp
import numpy as np

from dhr_jax import directions
from dhr_jax.directions import EditError
from dhr_jax.models.stylegan2 import Generator, feature_resolution


# --------------------------------------------------------------------------
# Editing codes

def layer_mask(layers, n_latent):
  """Boolean (n_latent,) mask of the edited layers.

  layers: None = all; a tuple (first, last) = the half-open range
  first ≤ l < last; a list / array / range of layer indices; or a slice.
  """
  if layers is None:
    return np.ones(n_latent, bool)
  if isinstance(layers, tuple):
    if len(layers) != 2:
      raise EditError(f"a layer range is (first, last), got {layers!r}; give "
                      "a list for explicit indices")
    first, last = (int(x) for x in layers)
    if not 0 <= first < last <= n_latent:
      raise EditError(f"layer range {layers!r} must satisfy 0 ≤ first < last "
                      f"≤ n_latent = {n_latent} (half-open)")
    layers = range(first, last)
  elif isinstance(layers, slice):
    layers = range(n_latent)[layers]
  idx = np.asarray(list(layers) if isinstance(layers, range) else layers)
  if idx.ndim != 1 or idx.size == 0 or not np.issubdtype(idx.dtype, np.integer):
    raise EditError(f"layers must be None, (first, last) or a non-empty list "
                    f"of indices, got {layers!r}")
  if idx.min() < 0 or idx.max() >= n_latent:
    raise EditError(f"layer indices {idx.tolist()} out of range for "
                    f"n_latent = {n_latent}")
  mask = np.zeros(n_latent, bool)
  mask[idx] = True
  return mask


def _check_codes(codes):
  codes = jnp.asarray(codes)
  if codes.ndim != 3:
    raise EditError(f"codes must be W+ (B, n_latent, style_dim), got shape "
                    f"{codes.shape}")
  return codes


def edit_codes(codes, direction, strengths, layers=None):
  """InterFaceGAN edit: w + α·n for every α in `strengths`.

  codes: (B, L, D) W+ codes.  direction: an array (D,), (1, D), (L, D) or
  (1, L, D), or a path given to `load_direction`.  strengths: a number or a
  sequence of S numbers.  layers: which layers move (see `layer_mask`);
  the others are returned unchanged, bit for bit.
  Returns (B, S, L, D); α = 0 returns the codes exactly.
  """
  codes = _check_codes(codes)
  _, n_latent, dim = codes.shape
  if isinstance(direction, (str, os.PathLike)):
    direction = directions.load_direction(direction)
  n = jnp.asarray(direction, codes.dtype)
  if n.ndim >= 2 and n.shape[0] == 1:
    n = n[0]
  if n.ndim == 1:
    n = jnp.broadcast_to(n, (n_latent,) + n.shape)
  if n.shape != (n_latent, dim):
    raise EditError(
        f"direction of shape {tuple(np.shape(direction))} does not fit codes "
        f"(B, {n_latent}, {dim}): expected ({dim},) or ({n_latent}, {dim})")
  alpha = jnp.atleast_1d(jnp.asarray(strengths, codes.dtype))
  if alpha.ndim != 1:
    raise EditError(f"strengths must be a number or a 1-D sequence, got "
                    f"shape {alpha.shape}")
  mask = jnp.asarray(layer_mask(layers, n_latent))[:, None]
  step = alpha[:, None, None] * n  # (S, L, D)
  # where, not multiply-by-mask: untouched layers stay exact even for α = inf.
  return jnp.where(mask, codes[:, None] + step, codes[:, None])


def _ganspace_delta(codes, pcs, c, first, last, strength, mode):
  """(B, L, D) move of one (component, first, last, strength) edit."""
  _, n_latent, dim = codes.shape
  k = pcs.components.shape[0]
  if not 0 <= c < k:
    raise EditError(f"GANSpace component {c} out of range: the file has {k}")
  v = jnp.asarray(pcs.components[c], codes.dtype)
  sigma = float(pcs.std[c])
  mask = jnp.asarray(layer_mask((first, last), n_latent))[:, None]
  if mode == "add":
    coeff = jnp.full((codes.shape[0],), strength, codes.dtype)
  elif mode == "set":
    if pcs.mean is None:
      raise EditError("GANSpace mode 'set' needs the mean of W; the "
                      "components have none")
    t = (codes[:, 0] - jnp.asarray(pcs.mean, codes.dtype)) @ v / sigma
    coeff = strength - t
  else:
    raise EditError(f"GANSpace mode must be 'add' or 'set', got {mode!r}")
  return jnp.where(mask, (coeff * sigma)[:, None, None] * v, 0.0)


def _as_edit_group(edit):
  """One output edit: a (c, first, last, s) tuple or a list of them."""
  if len(edit) and np.isscalar(edit[0]):
    edit = [edit]
  group = []
  for e in edit:
    if np.isscalar(e) or len(e) != 4 or not all(np.isscalar(x) for x in e):
      raise EditError(f"a GANSpace edit is (component, first, last, strength),"
                      f" got {e!r}")
    c, first, last, s = e
    if int(c) != c or int(first) != first or int(last) != last:
      raise EditError(f"component and layers must be integers in {e!r}")
    group.append((int(c), int(first), int(last), float(s)))
  return group


def ganspace_edit(codes, pcs, edits, mode="add"):
  """GANSpace layer-wise edits of W+ codes.

  codes: (B, L, D).  pcs: `PrincipalComponents` or a path for
  `load_ganspace`.  edits: a sequence of E edits, each one
  (component, first, last, strength) with layers first:last (half-open), or
  a list of such tuples applied together (all computed from the input codes).
  mode: "add" (GANSpace: strength in σ units) or "set" (e4e: strength is the
  target coordinate); see the module docstring.
  Returns (B, E, L, D).
  """
  codes = _check_codes(codes)
  if isinstance(pcs, (str, os.PathLike)):
    pcs = directions.load_ganspace(pcs)
  if pcs.components.shape[1] != codes.shape[2]:
    raise EditError(f"GANSpace components have dimension "
                    f"{pcs.components.shape[1]}, codes {codes.shape[2]}")
  if not len(edits):
    raise EditError("no GANSpace edits given")
  out = []
  for edit in edits:
    delta = sum(_ganspace_delta(codes, pcs, *e, mode=mode)
                for e in _as_edit_group(edit))
    out.append(codes + delta)
  return jnp.stack(out, axis=1)


# --------------------------------------------------------------------------
# Rendering


@functools.partial(jax.jit, static_argnames=("config", "feature_idx",
                                             "noise_axis"))
def _render(config, synthesis, codes, noise, offset, mask, *, feature_idx,
            noise_axis):
  G = Generator(config, None, None)

  def one(p, c, n, o, m):
    # c: (S, L, D), the edits of one image. They are rendered one at a time
    # (lax.map), not as a batch: a batched convolution rounds differently
    # with the batch size, and then the α = 0 edit would differ from the
    # inversion by ~1e-6 depending on which other strengths were asked for.
    if noise_axis == 0:
      n = [x[None] for x in n]
    kw = {}
    if o is not None:
      kw = dict(feature_idx=feature_idx, offset=o[None],
                mask=None if m is None else m[None])
    p = {"synthesis": p}
    return jax.lax.map(lambda code: G.synthesis(p, code[None], n, **kw)[0], c)

  return jax.vmap(one, in_axes=(0, 0, noise_axis, 0, 0))(
      synthesis, codes, noise, offset, mask)


def _leading(tree):
  return {np.shape(x)[0] if np.ndim(x) else None
          for x in jax.tree_util.tree_leaves(tree)}


@jax.jit
def _synthesize(G, codes):
  return G.synthesis(G.params, codes, G.noise)


def render(G, refinement, codes=None):
  """Images of (edited) codes with a refinement's weights, offset and mask.

  The one way codes become images: refinement None renders `codes` with the
  generator's own weights and fixed noise (an unrefined inversion, the
  embedding, the true edits of a synthetic image).

  G: the `Generator` the refinement was made with.  refinement: a
  `refine.Refinement` of B images (from `hybrid_refine`, `load_refined`,
  `r[i]`): every image is rendered with its own refined weights θ*, its
  offset o at the refinement's `feature_idx`, blended as f·m_f + o·(1 − m_f)
  with its mask m_f (no offset: plain synthesis), and its noise.
  codes: (B, S, L, D) — S edits per image — or (B, L, D); None = the
  refined codes themselves (the inversion).
  Images are vmapped, edits rendered in turn, so an edit's image does not
  depend on the other strengths of the call (α = 0 gives the inversion bit
  for bit on CPU); a different set of images may change it by float
  round-off (~1e-6), as per-image weights make a batched convolution.
  Returns (B, S, H, W, 3) or (B, H, W, 3), in [-1, 1] as the generator.
  """
  if refinement is None:
    codes = jnp.asarray(codes, jnp.float32)
    if codes.ndim == 3:
      return _synthesize(G, codes)
    b, n = codes.shape[:2]
    images = _synthesize(G, codes.reshape((b * n,) + codes.shape[2:]))
    return images.reshape((b, n) + images.shape[1:])
  r = refinement
  codes = jnp.asarray(r.codes if codes is None else codes)
  single = codes.ndim == 3
  if single:
    codes = codes[:, None]
  if codes.ndim != 4:
    raise EditError(f"codes must be (B, S, n_latent, style_dim) or "
                    f"(B, n_latent, style_dim), got {codes.shape}")
  b = codes.shape[0]
  want = jax.tree_util.tree_structure(G.params["synthesis"])
  if jax.tree_util.tree_structure(r.synthesis) != want:
    raise EditError("the refinement's weights are not this generator's "
                    "synthesis params (another architecture?)")
  for x, g in zip(jax.tree_util.tree_leaves(r.synthesis),
                  jax.tree_util.tree_leaves(G.params["synthesis"])):
    if tuple(np.shape(x)) != (b,) + tuple(np.shape(g)):
      raise EditError(
          f"the refinement's weights must have one copy per image: a "
          f"leading axis of {b} (the codes' batch) on every leaf of shape "
          f"{tuple(np.shape(g))}, got {tuple(np.shape(x))}")

  leads = _leading(list(r.noise))
  if leads == {1}:
    noise_axis = None
  elif leads == {b}:
    noise_axis = 0
  else:
    raise EditError(f"noise maps must all have batch 1 (shared) or {b} (per "
                    f"image), got {sorted(leads, key=str)}")

  offset, mask_feature, feature_idx = r.offset, r.mask_feature, r.feature_idx
  if offset is None:
    if mask_feature is not None:
      raise EditError("mask_feature needs an offset (the mask blends the "
                      "feature with the offset)")
    feature_idx = None
  else:
    if feature_idx is None or not (
        0 <= feature_idx < G.config["num_layers"]):
      raise EditError(f"feature_idx must be in [0, {G.config['num_layers']}) "
                      f"for this {G.config['size']}² generator, got "
                      f"{feature_idx}")
    res = feature_resolution(feature_idx)
    offset = jnp.asarray(offset)
    if offset.ndim != 4 or offset.shape[:3] != (b, res, res):
      raise EditError(f"offset must be (B={b}, {res}, {res}, C) for "
                      f"feature_idx {feature_idx}, got {offset.shape}")
    if mask_feature is not None:
      mask_feature = jnp.asarray(mask_feature)
      if mask_feature.ndim != 4 or mask_feature.shape[:3] != (b, res, res):
        raise EditError(f"mask_feature must be (B={b}, {res}, {res}, 1), got "
                        f"{mask_feature.shape}")
  images = _render(G.config, r.synthesis, codes, list(r.noise), offset,
                   mask_feature, feature_idx=feature_idx,
                   noise_axis=noise_axis)
  return images[:, 0] if single else images
