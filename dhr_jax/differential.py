"""Editing out-of-domain inversions via differential activations, the
method core (no run layer).

Song et al., "Editing Out-of-domain GAN Inversion via Differential
Activations" (ECCV 2022); published code: HaoruiSong622/Editing-Out-of-Domain,
`image_process.py`. Where DHR refines the inversion until it reproduces the
photo, this method does not refine: it edits pSp's codes, lets DiffCam's
differential activations say where the edit acts, pastes the edited image
into the photo there, and removes the paste's ghosting with a GAN-prior
restorer. For a photo x at the generator's size:

1. x → the encoder's input size by area pooling → pSp → W+ codes w (with
   the latent average); inverted = G(w) pooled to that size.
2. w' = w + α·d/‖d‖ (‖·‖ over the whole direction); manipulated = G(w') and
   its pooled copy.
3. heat map = Grad-CAM of the direction's class at DiffCam's layer4, on
   (inverted, pooled manipulated), at the encoder's input size.
4. The heat map → the generator's size (nearest); fused = manipulated·h +
   x·(1 − h); fused → the deghosting network's input size (area).
5. deghosted = D(fused), at D's output size.

The published script fixes the sizes for its 1024² FFHQ models (pSp and
DiffCam at 256², the heat map resized to 1024², deghosting 128² → 1024²).
Here they follow the models: the encoder's input size (`E.config
['input_size']`, 256 for every released pSp; the published code pools pSp's
output with the same literal 256 and runs DiffCam there), the generator's
size and the deghosting checkpoint's in/out sizes.

Differences from the published code (the method is otherwise its maths):
- It renders the inversion and the edit with fresh random noise
  (`randomize_noise=True`); here both use the generator's constant noise,
  so an edit is reproducible and inversion and edit differ by the codes
  only.
- A flat Grad-CAM map (e.g. no positive evidence) is 0/0 = NaN there; here
  it is all zeros: no edit region, the fused image is the photo, and
  `DifferentialEdit.empty` flags it so the caller can warn.
- It runs one image at a time on CUDA; here a batch is one jitted program.
"""
from typing import Any, Optional

from flax import struct
import jax
import jax.numpy as jnp
import numpy as np

from dhr_jax.models import diffcam
from dhr_jax.models.encoders import check_compatible
from dhr_jax.models.ops import adaptive_avg_pool, resize_nearest

ALPHA = 20.0  # image_process.py's --alpha default


@struct.dataclass
class DifferentialEdit:
  """What `differential_edit` computes for a batch (NHWC, [-1, 1]-scaled).

  Attributes:
    codes: (B, n_latent, 512) pSp's W+ codes (latent average included).
    edited_codes: codes + α·d/‖d‖.
    inverted: (B, S, S, 3) G(codes) at the generator's size S.
    manipulated: (B, S, S, 3) G(edited_codes).
    heat_map: (B, s, s) DiffCam's map in [0, 1] at the encoder's input
      size s (where DiffCam runs).
    fused: (B, S, S, 3) manipulated·h + x·(1 − h), h the heat map at S².
    deghosted: (B, out, out, 3) the deghosting network's output (None
      without one).
    empty: (B,) bool, images whose heat map was flat: no edit region
      (fused == x; NaN in the published code).
  """
  codes: Any
  edited_codes: Any
  inverted: Any
  manipulated: Any
  heat_map: Any
  fused: Any
  deghosted: Optional[Any]
  empty: Any


def unit_direction(direction):
  """d/‖d‖ over all of its entries, as the published script normalises a
  direction file ((n_latent, 512) or (512,))."""
  direction = jnp.asarray(direction, jnp.float32)
  return direction / jnp.sqrt(jnp.sum(direction * direction))


@struct.dataclass
class Inversion:
  """pSp's inversion of a batch, the part of the method every direction
  shares (`invert`): each edit (`edit_inversion`) starts from it.

  Attributes:
    x: (B, S, S, 3) the photos at the generator's size S.
    codes: (B, n_latent, 512) pSp's W+ codes (latent average included).
    inverted: (B, S, S, 3) G(codes).
    input_size: the encoder's input size s, where DiffCam runs (static).
  """
  x: Any
  codes: Any
  inverted: Any
  input_size: int = struct.field(pytree_node=False)


def invert_core(E, G, x):
  """Step 1: pSp's codes of x and their render, traceable (no checks:
  see `invert`)."""
  s = E.config["input_size"]
  codes = E.encode(E.params, adaptive_avg_pool(x, s), add_latent_avg=True)
  return Inversion(x=x, codes=codes, inverted=G.synthesis(G.params, codes),
                   input_size=s)


def edit_inversion_core(G, C, D, inv, direction, targets, alpha):
  """Steps 2–5 on an `Inversion`, traceable (no checks: see
  `edit_inversion`).

  G: the generator of the inversion; C: DiffCam; D: a deghosting network
  or None; direction broadcastable to (n_latent, 512); targets (B,) int32
  class indices; alpha: scalar.
  """
  s = inv.input_size
  size = G.config["size"]
  codes, x = inv.codes, inv.x
  edited = codes + alpha * unit_direction(direction)
  manipulated = G.synthesis(G.params, edited)
  x6 = jnp.concatenate([adaptive_avg_pool(inv.inverted, s),
                        adaptive_avg_pool(manipulated, s)], axis=-1)
  heat = diffcam.heat_maps(C, x6, targets)
  h = resize_nearest(heat, (size, size))[..., None]
  fused = manipulated * h + x * (1.0 - h)
  deghosted = None
  if D is not None:
    deghosted = D.deghost(
        D.params, adaptive_avg_pool(fused, D.config["in_size"]))
  return DifferentialEdit(
      codes=codes, edited_codes=edited, inverted=inv.inverted,
      manipulated=manipulated, heat_map=heat, fused=fused,
      deghosted=deghosted, empty=diffcam.empty_maps(heat))


def differential_edit_core(E, G, C, D, x, direction, targets, alpha):
  """The method on a batch, traceable (no checks: see `differential_edit`).

  E: pSp encoder (`load_encoder`), G: its generator, C: DiffCam, D: a
  deghosting network or None; x (B, S, S, 3) at G's size; direction
  broadcastable to (n_latent, 512); targets (B,) int32 class indices;
  alpha: scalar.
  """
  return edit_inversion_core(G, C, D, invert_core(E, G, x), direction,
                             targets, alpha)


# Two programs, so that the directions of a batch share one inversion.
_invert = jax.jit(invert_core)
_edit = jax.jit(edit_inversion_core)


def _photos(E, G, x):
  check_compatible(E, G, "psp")
  x = jnp.asarray(x, jnp.float32)
  size = G.config["size"]
  if x.ndim != 4 or x.shape[1:] != (size, size, 3):
    raise ValueError(f"x must be (B, {size}, {size}, 3) photos at the "
                     f"generator's size, got {x.shape}")
  return x


def _unit_input(G, direction):
  direction = np.asarray(direction, np.float32)
  want = (G.n_latent, G.config["style_dim"])
  if direction.shape not in (want, want[1:], (1,) + want):
    raise ValueError(f"direction must be {want} (or ({want[1]},)), got "
                     f"{direction.shape}")
  if not np.any(direction):
    raise ValueError("direction is all zeros: it has no unit direction")
  return jnp.asarray(direction[0] if direction.ndim == 3 else direction)


def invert(E, G, x):
  """pSp's inversion of photos x, once for all the directions to edit
  (`edit_inversion`). E, G, x: as `differential_edit`'s. Returns an
  `Inversion`."""
  return _invert(E, G, _photos(E, G, x))


def edit_inversion(G, C, D, inv, direction, targets, alpha=ALPHA):
  """One direction's edit of an `Inversion` (`invert`): steps 2–5 of the
  module docstring. G, C, D, direction, targets, alpha: as
  `differential_edit`'s. Returns a `DifferentialEdit`."""
  direction = _unit_input(G, direction)
  targets = diffcam.check_targets(C, targets, inv.x.shape[0])
  return _edit(G, C, D, inv, direction, jnp.asarray(targets, jnp.int32),
               jnp.float32(alpha))


def differential_edit(E, G, C, D, x, direction, targets, alpha=ALPHA):
  """Edits photos x as the published differential-activation pipeline.

  E: a pSp encoder (`dhr_jax.load_encoder`; the method is pSp's, other
  encoders are refused) whose codes fit G, the generator of its bundle
  (`dhr_jax.load_generator`); C: a DiffCam
  (`dhr_jax.load_diffcam`); D: a deghosting network
  (`dhr_jax.load_deghosting`) or None to stop at the fused image.
  x: (B, S, S, 3) in [-1, 1] at the generator's size S. direction: a W+
  direction ((n_latent, 512), or (512,) for every layer), normalised here.
  targets: DiffCam's class of the direction (`diffcam.direction_class`
  of a published direction's name), one for all images or (B,). alpha:
  the edit's strength along the unit direction (published default 20).
  Several directions of one batch: `invert` once, then `edit_inversion`
  per direction (the same results).

  Returns a `DifferentialEdit` (see its fields and the module docstring
  for the steps and the differences from the published code).
  """
  x = _photos(E, G, x)
  direction = _unit_input(G, direction)
  targets = diffcam.check_targets(C, targets, x.shape[0])
  return _edit(G, C, D, _invert(E, G, x), direction,
               jnp.asarray(targets, jnp.int32), jnp.float32(alpha))
