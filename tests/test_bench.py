"""The synthetic ground-truth benchmark runs end to end on a tiny generator
and its construction is what it claims (the in-domain target is exactly
reachable; only the weight modes move weights)."""
import importlib.util
import math
import os

from conftest import REPO


def _bench(name):
  path = os.path.join(REPO, "bench", name + ".py")
  spec = importlib.util.spec_from_file_location(name, path)
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod


def test_refine_synthetic_tiny():
  res = _bench("refine_synthetic").run([
      "--size", "32", "--channels", "16", "--style-dim", "16", "--images",
      "2", "--steps", "6", "--weight-steps", "3", "--directions", "2"])
  assert set(res) == {"none", "hybrid", "weight", "feature"}
  assert all(math.isfinite(v) for r in res.values() for v in r.values())
  none = res["none"]
  # G(w_true) is the target outside the patch, and the unedited generator
  # is its own ground-truth edit: exact (PSNR capped at 120 dB).
  assert none["psnr_in"] == 120.0 and none["edit_psnr"] == 120.0
  assert none["weight_dev"] == 0.0 and res["feature"]["weight_dev"] == 0.0
  assert res["hybrid"]["weight_dev"] > 0 and res["weight"]["weight_dev"] > 0
  # Every refinement fits the foreign patch better than the plain codes,
  # even in these few steps.
  for mode in ("hybrid", "weight", "feature"):
    assert res[mode]["psnr_out"] > none["psnr_out"] + 0.2, (mode, res)
    assert res[mode]["lpips_out"] < none["lpips_out"] - 0.02, (mode, res)
