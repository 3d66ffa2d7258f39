"""configs/pti.py: GANInverter's PTI setting on the shared refinement code,
and the per-element MSE normalisation it needs."""
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import REPO
from dhr_jax import refine
from dhr_jax.config_files import load_config
from dhr_jax.models.stylegan2 import init_generator


def _config(name):
  return load_config(os.path.join(REPO, "configs", name + ".py"))


def test_pti_config_is_ganinverters_setting():
  pti, dhr = _config("pti"), _config("dhr")
  rc = pti.refine
  assert rc.mode == "weight"
  assert rc.feature_steps == rc.weight_steps == 350
  assert rc.weight_lr == 3e-4
  assert rc.l2_lambda == 1.0 and rc.lpips_lambda == 1.0
  assert rc.mse_norm == "element" and dhr.refine.mse_norm == "pixel"
  # The pivot: PTI's own W pivot (GANInverter's pti_pivot.yaml), a fresh
  # optimisation from latent_avg; LPIPS only (the optimisation's default
  # latent noise 0.05 / ramp 0.75 and noise regulariser 1e5 are the yaml's).
  e = pti.embedding
  assert (e.method, e.init, e.space, e.steps, e.lr, e.mse_lambda) == (
      "optim", "latent_avg", "w", 450, 5e-3, 0.0)
  import inspect
  from dhr_jax import embedding
  defaults = inspect.signature(embedding.optimize_latent).parameters
  assert [defaults[k].default for k in ("noise", "noise_ramp",
                                        "noise_regularize")] == [
      0.05, 0.75, 1e5]
  # Everything else is DHR's.
  assert pti.model.to_dict() == dhr.model.to_dict()
  assert pti.edit.to_dict() == dhr.edit.to_dict()


def _pair(shape=(1, 8, 8, 3)):
  k1, k2 = jax.random.split(jax.random.PRNGKey(0))
  return (jax.random.uniform(k1, shape, minval=-1, maxval=1),
          jax.random.uniform(k2, shape, minval=-1, maxval=1))


def test_element_norm_is_f_mse_loss():
  image, target = _pair()
  ones = jnp.ones(image.shape[:3] + (1,))
  kw = dict(mask_feature=None, l2_lambda=1.0, lpips_lambda=1.0)
  pixel, _ = refine.refinement_losses(image, target, ones, **kw)
  element, _ = refine.refinement_losses(image, target, ones,
                                        mse_norm="element", **kw)
  mse = float(jnp.mean((image - target) ** 2))  # torch F.mse_loss
  # float32 means vs float64: measured ≤ 1.6e-7 relative (~1 ulp) for these
  # four; 1e-6 leaves a 6× margin, a wrong normalisation is off by ≥ 2×.
  np.testing.assert_allclose(float(element), mse, rtol=1e-6)
  np.testing.assert_allclose(float(pixel), 3 * mse, rtol=1e-6)
  # Under a partial mask: the per-element mean over the masked pixels.
  m = (jax.random.uniform(jax.random.PRNGKey(3), ones.shape) > 0.5
       ).astype(jnp.float32)
  loss_in, loss_out = refine.refinement_losses(image, target, m,
                                               mse_norm="element", **kw)
  se = np.asarray((image - target) ** 2)
  sel = np.asarray(m[..., 0]) > 0
  np.testing.assert_allclose(float(loss_in), se[sel].mean(), rtol=1e-6)
  np.testing.assert_allclose(float(loss_out), se[~sel].mean(), rtol=1e-6)
  with pytest.raises(ValueError, match="mse_norm must be one of"):
    refine.refine_spec(init_generator(jax.random.PRNGKey(0), size=8,
                                      style_dim=8, n_mlp=1, channels=4),
                       feature_idx=1, mse_norm="mean")


def test_weight_mode_with_element_norm_minimises_f_mse_loss():
  """Through hybrid_refine: the PTI loss is reported (and so minimised)."""
  G = init_generator(jax.random.PRNGKey(0), size=16, style_dim=16, n_mlp=1,
                     channels=8)
  codes = jax.random.normal(jax.random.PRNGKey(1), (1, G.n_latent, 16))
  target = jax.random.uniform(jax.random.PRNGKey(2), (1, 16, 16, 3),
                              minval=-1, maxval=1)
  kw = dict(feature_idx=3, feature_steps=2, weight_steps=2, mode="weight",
            lpips_lambda=0.0, weight_lr=3e-4)
  r_el = refine.hybrid_refine(G, codes, target, mse_norm="element", **kw)
  r_px = refine.hybrid_refine(G, codes, target, **kw)
  first = float(jnp.mean((G.synthesis(G.params, codes) - target) ** 2))
  # The first loss is that of the unrefined generator: F.mse_loss, and
  # DHR's pixel normalisation is 3× it. Measured ≤ 1.9e-7 relative from the
  # float64 mean of the eagerly rendered image; the refinement renders inside
  # its own compiled loop, whose convolutions may round differently on other
  # CPUs, hence 1e-5 (a wrong normalisation is off by ≥ 2×).
  np.testing.assert_allclose(float(r_el.losses_in[0, 0]), first, rtol=1e-5)
  np.testing.assert_allclose(float(r_px.losses_in[0, 0]), 3 * first,
                             rtol=1e-5)
