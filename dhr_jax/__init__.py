"""dhr_jax: Domain-Specific Hybrid Refinement for GAN inversion, in JAX/Flax.

Public API (imported lazily so `import dhr_jax` stays cheap; `help` and `dir`
list every name, `__all__`):
  load_generator, init_generator, Generator, truncate — StyleGAN2
  load_encoder, load_parser                   — encoders (e4e, pSp, ReStyle)
                                                and the FaRL parser
  restyle_invert                              — ReStyle's iterative inversion
  load_id_network, id_curricularface          — the paper's ID metric
  load_hfgi, hfgi_invert                      — HFGI, the encoder baseline
  load_diffcam, diff_cam                      — DiffCam heat maps (editing via
                                                differential activations)
  load_deghosting                             — differential-activation
                                                editing's deghosting network
  differential_edit                           — the differential-activation
                                                edit (pSp, DiffCam, deghosting)
  load_lpips                                  — LPIPS (AlexNet / VGG)
  optimize_latent, coarse_inversion           — the embedding stage
  domain_specific_segmentation                — the in/out-of-domain mask
  hybrid_refine → Refinement                  — weight + feature refinement
  default_feature_idx                         — the refined feature layer
  edit_codes, render, load_direction          — editing refined inversions
  ganspace_edit, load_ganspace                — GANSpace edits
  save_refined, load_refined                  — one refined image on disk
  run_batch                                   — the whole pipeline on a batch
  paper_metrics                               — MSE/PSNR/LPIPS as the paper
"""
import importlib

__version__ = "0.1.0"

_EXPORTS = {
    "load_generator": "dhr_jax.models.stylegan2",
    "init_generator": "dhr_jax.models.stylegan2",
    "Generator": "dhr_jax.models.stylegan2",
    "truncate": "dhr_jax.models.stylegan2",
    "load_encoder": "dhr_jax.models.encoders",
    "restyle_invert": "dhr_jax.models.encoders",
    "load_parser": "dhr_jax.models.farl",
    "load_id_network": "dhr_jax.models.curricularface",
    "id_curricularface": "dhr_jax.identity",
    "load_hfgi": "dhr_jax.models.hfgi",
    "hfgi_invert": "dhr_jax.models.hfgi",
    "load_diffcam": "dhr_jax.models.diffcam",
    "diff_cam": "dhr_jax.models.diffcam",
    "load_deghosting": "dhr_jax.models.deghosting",
    "differential_edit": "dhr_jax.differential",
    "load_lpips": "dhr_jax.models.lpips",
    "optimize_latent": "dhr_jax.embedding",
    "coarse_inversion": "dhr_jax.embedding",
    "domain_specific_segmentation": "dhr_jax.segmentation",
    "hybrid_refine": "dhr_jax.refine",
    "Refinement": "dhr_jax.refine",
    "default_feature_idx": "dhr_jax.refine",
    "edit_codes": "dhr_jax.editing",
    "render": "dhr_jax.editing",
    "ganspace_edit": "dhr_jax.editing",
    "load_direction": "dhr_jax.directions",
    "load_ganspace": "dhr_jax.directions",
    "save_refined": "dhr_jax.refine",
    "load_refined": "dhr_jax.refine",
    "run_batch": "dhr_jax.methods",
    "paper_metrics": "dhr_jax.metrics",
}
# Every model file's loader is its `load`; the package names it by model.
_RENAMED = {name: "load" for name in (
    "load_generator", "load_encoder", "load_parser", "load_id_network",
    "load_hfgi", "load_lpips", "load_diffcam", "load_deghosting")}
# pydoc documents a module's functions defined elsewhere only when __all__
# names them; listing them here imports nothing.
__all__ = sorted(_EXPORTS)


def __getattr__(name):
  module = _EXPORTS.get(name)
  if module is None:
    raise AttributeError(f"module 'dhr_jax' has no attribute {name!r}")
  return getattr(importlib.import_module(module), _RENAMED.get(name, name))


def __dir__():
  return sorted(list(globals()) + list(_EXPORTS))
