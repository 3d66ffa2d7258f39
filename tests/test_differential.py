"""Editing via differential activations end to end: `differential_edit` on
stand-in weights against the published image_process.py pipeline run on the
same weights (tests/fixtures/da_pipeline_64.npz and .txt), through the
released file layouts and the project's converters; the flat heat map."""
import json

import jax
import numpy as np
import pytest

import dhr_jax
from conftest import rel_l2
from conftest import same_stand_in
from converters import deghosting as deghosting_converter
from converters import diffcam as diffcam_converter
from converters import encoder as encoder_converter
from dhr_jax import differential
from dhr_jax.models import diffcam
from dhr_jax.models.ops import adaptive_avg_pool

torch = pytest.importorskip("torch")

FIXTURE = "tests/fixtures/da_pipeline_64.npz"

# Measured 2026-12-06 (x86 CPU), relative L2 (codes / manipulated / heat map
# / fused / deghosted): the published pipeline in float32 vs itself in
# float64 (the fixture's meta 'float32_vs_float64'): 1.1e-6 / 1.5e-6 /
# 4.2e-6 / 4.7e-6 / 8.0e-6; dhr_jax in float64 (jax_enable_x64) vs the
# published float64 run: 1.2e-8 / 1.6e-8 / 1.3e-8 / 2.0e-8 / 4.0e-8 (the same
# maths); dhr_jax float32 vs the fixture (printed below): 2.2e-6 / 2.7e-6 /
# 7.9e-6 / 9.4e-6 / 1.3e-5, the sum of two float32 rounding errors. 1e-4, the
# issue's level, leaves ~7x over that; a wrong resize is > 1e-2 (the heat
# map area-pooled to 64² instead of torch's nearest: fused 1.9e-2; nearest
# at pixel centres: 2.5e-2).
TOL = 1e-4

# Stand-in weights of real-size networks (pSp's encoder 152M, ResNet-101
# 43M, the deghosting network 141M, the generator 27M values, drawn by
# rule.py), saved, converted and compiled: about a minute on a quiet 2-core
# CPU, several on a busy one.
pytestmark = pytest.mark.slow


def _nhwc(a):
  return np.transpose(a, (0, 2, 3, 1))


def _t(v):
  return torch.from_numpy(np.ascontiguousarray(v))


@pytest.fixture(scope="module")
def fixture():
  z = np.load(FIXTURE, allow_pickle=False)
  manifest = json.loads(str(z["manifest"]))
  return manifest, {k: z[k] for k in z.files if k != "manifest"}


@pytest.fixture(scope="module")
def models(fixture, golden, golden_converted, rule, tmp_path_factory):
  """The fixture's stand-in weights saved as the released files (pSp
  bundle, diff_cam_weight.pt, deghosting.pt), converted by the project's
  converters, loaded. DiffCam and the deghosting network are the golden
  ones of test_diffcam and test_deghosting (the fixture's parts give the
  same weights, checked here), converted once per session (conftest's
  golden_converted)."""
  manifest, ref = fixture
  parts = dict(manifest["parts"])
  shared = {"diffcam": ("da_diffcam_128", diffcam_converter),
            "deghosting": ("da_deghosting_16_64", deghosting_converter)}
  converted = {}
  for part, (name, converter) in shared.items():
    assert same_stand_in(parts.pop(part), golden(name)[0]), part
    code, err, converted[part] = golden_converted(name, converter)
    assert code == 0, err
  sd = {k: rule.state_dict_from_manifest(m) for k, m in parts.items()}
  tmp = tmp_path_factory.mktemp("differential")
  sizes = manifest["meta"]["sizes"]
  bundle = {"state_dict": {**{"encoder." + k: _t(v) for k, v in
                              sd["psp_encoder"].items()},
                           **{"decoder." + k: _t(v) for k, v in
                              sd["generator"].items()}},
            "latent_avg": _t(ref["latent_avg"]),
            "opts": {"encoder_type": "GradualStyleEncoder", "input_nc": 3,
                     "output_size": sizes["generator"],
                     "start_from_latent_avg": True, "learn_in_w": False}}
  torch.save(bundle, tmp / "psp.pt")
  assert encoder_converter.main(["--src", str(tmp / "psp.pt"), "--dst",
                                 str(tmp / "psp")]) == 0
  return (dhr_jax.load_encoder(tmp / "psp", arch="psp"),
          dhr_jax.load_generator(tmp / "psp"),
          dhr_jax.load_diffcam(converted["diffcam"]),
          dhr_jax.load_deghosting(converted["deghosting"]))


@pytest.fixture(scope="module")
def edit(models, fixture):
  manifest, ref = fixture
  E, G, C, D = models
  meta = manifest["meta"]
  assert differential.ALPHA == meta["alpha"]
  return differential.differential_edit(
      E, G, C, D, _nhwc(ref["x"]), ref["direction"],
      diffcam.direction_class(meta["direction_name"]))


def test_matches_published_pipeline(edit, fixture, models):
  _, ref = fixture
  E = models[0]
  s = E.config["input_size"]
  got = {
      "codes": edit.codes,
      # The fixture holds pSp's output as the published code uses it:
      # pooled to the encoder's input size.
      "inverted": adaptive_avg_pool(edit.inverted, s),
      "manipulated": edit.manipulated,
      "heat_map": edit.heat_map,
      "fused": edit.fused,
      "deghosted": edit.deghosted,
  }
  stored = {"deghosted": "output"}  # the fixture's name for it
  want = {k: ref[k] if k in ("codes", "heat_map") else
          _nhwc(ref[stored.get(k, k)]) for k in got}
  err = {k: rel_l2(np.asarray(got[k]), want[k]) for k in got}
  print("differential_edit vs the published pipeline: " + ", ".join(
      f"{k} {v:.1e}" for k, v in err.items()))
  for k in got:
    assert np.asarray(got[k]).shape == want[k].shape, k
  assert all(v <= TOL for v in err.values()), err
  assert not np.asarray(edit.empty).any()
  assert edit.heat_map.shape == (2, s, s)


def test_flat_heat_map_is_no_edit(models, fixture):
  """The direction's class gets a zero fc column: its gradient, hence the
  map, is zero everywhere (0/0 = NaN in the published code). No region is
  edited: the fused image is the photo, bit for bit, and `empty` says so."""
  manifest, ref = fixture
  E, G, C, D = models
  target = manifest["meta"]["target"]
  params = jax.tree_util.tree_map(lambda a: a, C.params)
  params["fc"]["kernel"] = params["fc"]["kernel"].at[:, target].set(0.0)
  x = _nhwc(ref["x"])
  out = differential.differential_edit(E, G, C.replace(params=params), D, x,
                                       ref["direction"], target)
  np.testing.assert_array_equal(np.asarray(out.heat_map), 0.0)
  np.testing.assert_array_equal(np.asarray(out.fused), x)
  assert np.asarray(out.empty).tolist() == [True, True]
  for name in ("manipulated", "fused", "deghosted"):
    assert np.isfinite(np.asarray(getattr(out, name))).all()


def test_refuses_bad_arguments(models, fixture):
  _, ref = fixture
  E, G, C, D = models
  x = _nhwc(ref["x"])
  d = ref["direction"]
  with pytest.raises(ValueError, match=r"\(B, 64, 64, 3\)"):
    differential.differential_edit(E, G, C, D, x[:, :32, :32], d, 15)
  with pytest.raises(ValueError, match=r"direction must be \(10, 512\)"):
    differential.differential_edit(E, G, C, D, x, np.zeros((18, 512)), 15)
  with pytest.raises(ValueError, match="all zeros"):
    differential.differential_edit(E, G, C, D, x, 0 * d, 15)
  with pytest.raises(ValueError, match="17 classes"):
    differential.differential_edit(E, G, C, D, x, d, 17)
