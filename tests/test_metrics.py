"""The paper's reconstruction metrics (GANInverter's scripts/test.py)."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

import dhr_jax
from dhr_jax import metrics


def test_paper_metrics_equal_the_official_script(golden):
  """paper_metrics_1024.npz: two 1024² real-photo targets and unclamped
  inversions through the official metric lines."""
  _, g = golden("paper_metrics_1024")
  got = dhr_jax.paper_metrics(g["inversion"].transpose(0, 2, 3, 1),
                              g["targets_u8"])
  # Measured (x86_64 Xeon): relative errors ≤ 1.2e-7 (mse), 7.1e-8 (psnr),
  # 4.8e-7 (lpips); a float64 recomputation (quantised in float32 as the
  # official code) is ≤ 2.2e-7 from the golden, i.e. the golden's own float32
  # round-off. Both float32 implementations sum convolutions in their own
  # order: the 1e-5 of test_lpips, 20× the measurement.
  for k in ("mse", "psnr", "lpips"):
    assert got[k].shape == (2,)
    np.testing.assert_allclose(got[k], g[k], rtol=1e-5, atol=0, err_msg=k)


def _float2uint2float_torch(x):
  # The official quantisation, restated with torch: clamp, then the cast to
  # uint8 truncates.
  t = torch.from_numpy(x)
  u = ((t + 1) / 2 * 255.).clamp(min=0, max=255).to(torch.uint8)
  return ((u.float().div(255.) - 0.5) / 0.5).numpy()


def test_quantise_truncates_as_torch():
  rng = np.random.default_rng(0)
  # Out-of-range values, and values on and beside every uint8 boundary,
  # where rounding and truncation differ.
  levels = np.arange(256, dtype=np.float32) / np.float32(127.5) - 1
  x = np.concatenate([
      rng.normal(0, 0.8, 4096).astype(np.float32), levels,
      np.nextafter(levels, np.float32(-2)), np.nextafter(levels,
                                                         np.float32(2)),
      levels + np.float32(0.5 / 127.5), np.float32([-7, -1, 1, 7])])
  np.testing.assert_array_equal(metrics.quantise(x),
                                _float2uint2float_torch(x))
  # Truncation, not rounding: 0.9 of a level up stays on the level below.
  assert metrics.quantise(np.float32([-1 + 0.9 / 127.5]))[0] == -1


@pytest.mark.parametrize("size", [1024, 300, 64, 32, 256])
def test_antialiased_resize_equals_torch(size):
  rng = np.random.default_rng(size)
  x = rng.normal(0, 1, (2, 3, size, size)).astype(np.float32)
  want = F.interpolate(torch.from_numpy(x), size=(256, 256), mode="bilinear",
                       antialias=True, align_corners=False).numpy()
  got = np.asarray(metrics.resize_antialiased(x.transpose(0, 2, 3, 1)))
  # Measured: ≤ 4.8e-7 absolute for values up to 5.3, one float32 rounding
  # of a weighted sum; bound: 4 ulps of the largest value.
  bound = 4 * np.finfo(np.float32).eps * np.abs(want).max()
  assert np.abs(got.transpose(0, 3, 1, 2) - want).max() <= bound


def test_paper_metrics_of_the_target_itself_and_bad_input():
  rng = np.random.default_rng(1)
  # 256²: no resize, so only the quantisation stands between the two.
  u8 = rng.integers(0, 255, (1, 256, 256, 3), dtype=np.uint8)
  lp = dhr_jax.load_lpips("alex")
  # Half a level above the target's pixels truncates to them: MSE 0, inf dB.
  # (u / 127.5 − 1 itself would not always: float32 rounding puts (x+1)/2·255
  # just below u for u = 1..63, and truncation drops a level, as torch does.)
  x = (u8.astype(np.float32) + 0.5) / 127.5 - 1
  m = metrics.paper_metrics(x, u8, lp)
  assert m["mse"][0] == 0 and m["psnr"][0] == np.inf
  assert abs(m["lpips"][0]) < 1e-6
  # A non-finite inversion scores NaN, not a number from garbage pixels.
  x[0, 0, 0, 0] = np.nan
  assert np.isnan(metrics.paper_metrics(x, u8, lp)["mse"][0])
  with pytest.raises(ValueError, match="uint8"):
    metrics.paper_metrics(x, x, lp)
