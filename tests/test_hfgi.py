"""HFGI: parity with the official code (golden fixture) through a real .pt in
the released layout and the converter; the GANInverter layout; refusals;
the generator's feature hook; the torch-equivalent bilinear resize."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import dhr_jax
from conftest import rel_l2
from converters import e4e as e4e_converter
from converters import hfgi as hfgi_converter
from converters import stylegan2 as stylegan2_converter
from dhr_jax.models import hfgi, ops
from dhr_jax.models.stylegan2 import (feature_blend, feature_modulation,
                                      init_generator)
from test_e4e import OPTS, _lazy_encoder, _save_bundle

torch = pytest.importorskip("torch")

HFGI_OPTS = dict(OPTS, stylegan_size=64)


def nhwc(x):
  return jnp.asarray(np.transpose(x, (0, 2, 3, 1)))


def _t(v):
  return v if isinstance(v, torch.Tensor) else torch.from_numpy(
      np.ascontiguousarray(v))


@pytest.fixture(scope="module")
def weights(rule, golden):
  """The stand-in weights of the fixture: generator (stylegan2_64's
  manifest), aligner/residue (hfgi_64's, prefixes stripped), a lazily
  expanded e4e encoder for 10 styles, latent_avg; and hfgi_64's arrays."""
  g_manifest, _ = golden("stylegan2_64")
  manifest, arrays = golden("hfgi_64")
  sd = rule.state_dict_from_manifest(manifest)
  nets = {net: {k[len(net) + 1:]: v for k, v in sd.items()
                if k.startswith(net + ".")}
          for net in ("grid_align", "residue")}
  return dict(decoder=rule.state_dict_from_manifest(g_manifest),
              encoder=_lazy_encoder(golden, n_styles=10),
              latent_avg=np.tile(rule.rule_array("latent_avg_64", (1, 512)),
                                 (10, 1)),
              arrays=arrays, manifest=manifest, **nets)


def _save_released(path, w, drop=(), replace=None):
  """torch.save in HFGI's released layout; `drop`: networks left out,
  `replace`: {'residue.<key>': array} overriding entries."""
  foreign = {}
  for net in ("grid_align", "residue"):
    if net not in drop:
      foreign.update({f"{net}.{k}": _t(v) for k, v in w[net].items()})
  foreign.update({k: _t(v) for k, v in (replace or {}).items()})
  return _save_bundle(path, w["encoder"], w["decoder"], w["latent_avg"],
                      HFGI_OPTS, foreign)


def _save_ganinverter(path, w, nets=("grid_align", "residue")):
  """torch.save as GANInverter's convert_weight / trainer lay it out."""
  encoder = {"encoder." + k: _t(v) for k, v in w["encoder"].items()}
  encoder["latent_avg"] = _t(w["latent_avg"])
  ckpt = {"encoder": encoder,
          "decoder": {k: _t(v) for k, v in w["decoder"].items()},
          "opts": dict(HFGI_OPTS, resolution=64), "global_step": 12}
  names = {"grid_align": "align", "residue": "res"}
  for net in nets:
    ckpt[names[net]] = {k: _t(v) for k, v in w[net].items()}
  torch.save(ckpt, path)
  return str(path)


@pytest.fixture(scope="module")
def converted(weights, tmp_path_factory):
  """The released-layout .pt converted by `python -m converters.hfgi`."""
  tmp = tmp_path_factory.mktemp("hfgi")
  src = _save_released(tmp / "hfgi_64.pt", weights)
  assert hfgi_converter.main(["--src", src, "--dst", str(tmp / "ckpt")]) == 0
  return tmp / "ckpt"


@pytest.fixture(scope="module")
def models(converted):
  return dhr_jax.load_generator(converted), dhr_jax.load_hfgi(converted)


# --------------------------------------------------------------------------
# Parity with the official HFGI code.

# Measured by running this pipeline in float64 (jax_enable_x64, same
# weights): the fixture's own float32 error is 3.4e-6 (res_aligned_edit) to
# 4.9e-6 (edited) relative L2, ours (float32 vs float64) 2.6e-6 to 3.2e-6,
# and the two float32 runs differ by 4.1e-6 to 5.8e-6. 1e-4 leaves a >15×
# margin for other CPUs; a real mistake (wrong layer, resize or feature
# index) is > 1e-2.
TOL = 1e-4


def test_golden_parity_inversion(models, weights):
  G, H = models
  ref = weights["arrays"]
  out = hfgi.hfgi_forward(G, H, ref["codes"], nhwc(ref["input"]))
  errs = {
      "emb_image": rel_l2(out["embedded"], nhwc(ref["emb_image"])),
      "res": rel_l2(out["res"], nhwc(ref["res"])),
      "res_aligned": rel_l2(out["res_aligned"], nhwc(ref["res_aligned"])),
      "scale_c16": rel_l2(out["scale"][..., :16], nhwc(ref["scale_c16"])),
      "shift_c16": rel_l2(out["shift"][..., :16], nhwc(ref["shift_c16"])),
      "image": rel_l2(out["image"], nhwc(ref["image"])),
  }
  print("hfgi parity:", {k: f"{v:.1e}" for k, v in errs.items()})
  assert all(v <= TOL for v in errs.values()), errs
  assert out["scale"].shape == (2, 64, 64, 512)
  # The conditions matter: the refined image is not the plain embedding.
  assert rel_l2(out["image"], out["embedded"]) > 0.1
  # The public entry point returns the same image.
  image = dhr_jax.hfgi_invert(G, H, ref["codes"], nhwc(ref["input"]))
  np.testing.assert_array_equal(np.asarray(image), np.asarray(out["image"]))


def test_golden_parity_ada_edit(models, weights):
  G, H = models
  ref = weights["arrays"]
  edited_codes = ref["codes"] + 1.5 * ref["direction"][:, None, :]
  out = hfgi.hfgi_forward(G, H, ref["codes"], nhwc(ref["input"]),
                          edited_codes=edited_codes)
  err_align = rel_l2(out["res_aligned"], nhwc(ref["res_aligned_edit"]))
  err_res = rel_l2(out["res"], nhwc(ref["res"]))  # the inversion's residual
  err_img = rel_l2(out["image"], nhwc(ref["edited"]))
  print(f"ADA edit parity: res_aligned {err_align:.1e}, edited {err_img:.1e}")
  assert err_align <= TOL and err_res <= TOL and err_img <= TOL
  edited = dhr_jax.hfgi_invert(G, H, ref["codes"], nhwc(ref["input"]),
                               edited_codes=edited_codes)
  np.testing.assert_array_equal(np.asarray(edited), np.asarray(out["image"]))


def test_bundle_serves_all_three_loaders(converted, weights):
  E = dhr_jax.load_encoder(converted)
  G = dhr_jax.load_generator(converted)
  H = dhr_jax.load_hfgi(converted)
  assert E.config["n_latent"] == 10 and G.config["size"] == 64
  np.testing.assert_array_equal(np.asarray(E.latent_avg),
                                weights["latent_avg"])
  assert H.config == hfgi.OFFICIAL and H.config.feature_idx == 8


def test_hfgi_is_a_jit_argument(models):
  """H is a pytree: one compiled program serves other weights."""
  _, H = models
  traces = []

  def consult(H, x):
    traces.append(1)  # runs only while jax traces
    return H.consult(H.params, x)[0][..., :4]

  x = jax.random.normal(jax.random.PRNGKey(0), (1, 256, 256, 3))
  f = jax.jit(consult)
  a = f(H, x)
  H2 = H.replace(params=jax.tree_util.tree_map(lambda p: p * 0.5, H.params))
  b = f(H2, x)
  assert len(traces) == 1
  assert rel_l2(a, b) > 1e-2


def test_invert_checks_its_inputs(models, weights):
  G, H = models
  codes = weights["arrays"]["codes"]
  with pytest.raises(ValueError, match=r"images must be \(2, 256, 256, 3\)"):
    hfgi.hfgi_invert(G, H, codes, jnp.zeros((2, 64, 64, 3)))
  with pytest.raises(ValueError, match="codes must be W\\+"):
    hfgi.hfgi_invert(G, H, codes[:, :5], jnp.zeros((2, 256, 256, 3)))
  with pytest.raises(ValueError, match="edited_codes must have the shape"):
    hfgi.hfgi_invert(G, H, codes, jnp.zeros((2, 256, 256, 3)),
                     edited_codes=codes[:1])


# --------------------------------------------------------------------------
# The GANInverter layout, in every converter that reads it.


def _assert_trees_equal(a, b):
  la, ta = jax.tree_util.tree_flatten(a)
  lb, tb = jax.tree_util.tree_flatten(b)
  assert ta == tb
  for x, y in zip(la, lb):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_ganinverter_layout_hfgi(tmp_path, weights, models):
  src = _save_ganinverter(tmp_path / "hfgi_gi.pt", weights)
  dst = tmp_path / "ckpt"
  assert hfgi_converter.main(["--src", src, "--dst", str(dst)]) == 0
  G, H = models  # from the released layout (golden parity above)
  _assert_trees_equal(dhr_jax.load_hfgi(dst).params, H.params)
  G2 = dhr_jax.load_generator(dst)
  _assert_trees_equal((G2.params, G2.noise), (G.params, G.noise))
  np.testing.assert_array_equal(np.asarray(dhr_jax.load_encoder(dst)
                                           .latent_avg), weights["latent_avg"])


def test_ganinverter_layout_e4e_and_stylegan2(tmp_path, weights, models,
                                              capsys):
  G, _ = models
  src = _save_ganinverter(tmp_path / "e4e_gi.pt", weights, nets=())
  e4e_dst, g_dst = tmp_path / "e4e", tmp_path / "g"
  assert e4e_converter.main(["--src", src, "--dst", str(e4e_dst)]) == 0
  assert stylegan2_converter.main(["--src", src, "--dst", str(g_dst)]) == 0
  E = dhr_jax.load_encoder(e4e_dst)
  np.testing.assert_array_equal(np.asarray(E.latent_avg), weights["latent_avg"])
  assert E.config["n_latent"] == 10
  for d in (e4e_dst, g_dst):
    G2 = dhr_jax.load_generator(d)
    _assert_trees_equal((G2.params, G2.noise), (G.params, G.noise))
    # converters.stylegan2 averages the (equal) rows: exact up to an ulp.
    np.testing.assert_allclose(np.asarray(G2.latent_avg),
                               weights["latent_avg"][0], rtol=1e-6)
  # The e4e converter does not drop HFGI's networks silently.
  src = _save_ganinverter(tmp_path / "hfgi_gi.pt", weights)
  assert e4e_converter.main(["--src", src, "--dst",
                             str(tmp_path / "no")]) == 2
  err = capsys.readouterr().err
  assert "'align', 'res'" in err and "converters.hfgi" in err


# --------------------------------------------------------------------------
# Refusals.


def _cli(src, dst, capsys):
  code = hfgi_converter.main(["--src", str(src), "--dst", str(dst)])
  return code, capsys.readouterr().err


def test_refuses_missing_residue(tmp_path, weights, capsys):
  src = _save_released(tmp_path / "no_residue.pt", weights, drop=("residue",))
  code, err = _cli(src, tmp_path / "out", capsys)
  assert code == 2 and err.startswith("error: ")
  assert src in err and "no residue.* entries" in err
  assert not (tmp_path / "out").exists()


def test_refuses_missing_network_ganinverter(tmp_path, weights, capsys):
  src = _save_ganinverter(tmp_path / "no_align.pt", weights,
                          nets=("residue",))
  code, err = _cli(src, tmp_path / "out", capsys)
  assert code == 2 and "no ['align'] entries" in err
  assert not (tmp_path / "out").exists()


def test_refuses_wrong_shape(tmp_path, weights, capsys):
  bad = {"residue.condition_scale3.0.weight":
         np.zeros((512, 48, 3, 3), np.float32)}
  src = _save_released(tmp_path / "bad.pt", weights, replace=bad)
  code, err = _cli(src, tmp_path / "out", capsys)
  assert code == 2
  assert "(residue.*)" in err and "shape of condition_scale3.0.weight" in err
  assert "(512, 48, 3, 3)" in err and "(512, 64, 3, 3)" in err
  assert not (tmp_path / "out").exists()


def test_e4e_converter_points_to_hfgi(tmp_path, weights, capsys):
  src = _save_released(tmp_path / "hfgi.pt", weights)
  code = e4e_converter.main(["--src", src, "--dst", str(tmp_path / "out")])
  err = capsys.readouterr().err
  assert code == 2 and "grid_align." in err and "converters.hfgi" in err


def test_expected_shapes_match_released_layout(weights):
  released = {k: tuple(s) for k, s, d in weights["manifest"]["entries"]
              if d != "int64"}
  ours = {f"{net}.{k}": v for net in ("grid_align", "residue")
          for k, v in hfgi_converter.expected_shapes(net).items()}
  assert sorted(set(ours) ^ set(released)) == []
  assert ours == released


# --------------------------------------------------------------------------
# The generator's feature hook and the bilinear resize.


@pytest.fixture(scope="module")
def small_generator():
  return init_generator(jax.random.PRNGKey(0), size=16, style_dim=16,
                        n_mlp=1, channels=8)


def test_feature_fn_is_the_offset_path(small_generator):
  """DHR's offset/mask and the same blend given as feature_fn are one hook:
  bit-identical images."""
  G = small_generator
  w = jax.random.normal(jax.random.PRNGKey(1), (1, G.n_latent, 16))
  k = 4
  _, f = G.synthesis(G.params, w, feature_idx=k, return_feature=True)
  offset = f + jax.random.normal(jax.random.PRNGKey(2), f.shape)
  mask = jax.random.uniform(jax.random.PRNGKey(3), f.shape[:3] + (1,))
  a = G.synthesis(G.params, w, feature_idx=k, offset=offset, mask=mask)
  b = G.synthesis(G.params, w, feature_idx=k,
                  feature_fn=feature_blend(offset, mask))
  np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  plain = G.synthesis(G.params, w)
  assert float(jnp.max(jnp.abs(a - plain))) > 1e-2
  # Zero conditions leave the generator exactly as it is.
  zero = jnp.zeros_like(f)
  c = G.synthesis(G.params, w, feature_idx=k,
                  feature_fn=feature_modulation(zero, zero))
  np.testing.assert_array_equal(np.asarray(c), np.asarray(plain))
  with pytest.raises(ValueError, match="either offset"):
    G.synthesis(G.params, w, feature_idx=k, offset=offset,
                feature_fn=feature_blend(offset))
  with pytest.raises(ValueError, match="need a feature_idx"):
    G.synthesis(G.params, w, feature_fn=feature_blend(offset))


@pytest.mark.parametrize("src,dst,align_corners", [
    ((64, 64), (256, 256), False),    # HFGI's upsampling of G(w)
    ((64, 48), (16, 20), False),      # shrinking: two taps, no antialiasing
    ((5, 7), (9, 13), False),
    ((5, 7), (9, 13), True),          # the e4e FPN's upsampling
])
def test_resize_bilinear_matches_torch(src, dst, align_corners):
  x = np.random.RandomState(0).randn(2, *src, 3)
  ref = torch.nn.functional.interpolate(
      torch.from_numpy(x.transpose(0, 3, 1, 2)), size=dst, mode="bilinear",
      align_corners=align_corners).numpy().transpose(0, 2, 3, 1)
  ours = ops.resize_bilinear_torch(jnp.asarray(x, jnp.float32), dst,
                                   align_corners)
  # Against torch in float64 (|x| ≤ 4.5): ours in float32 measured ≤ 4.3e-7
  # off, torch's own float32 up to 1.0e-5 (it rounds the source positions
  # when shrinking), so 5e-6 is ~10× our error and any wrong tap is > 1e-2.
  np.testing.assert_allclose(np.asarray(ours), ref, atol=5e-6)


def test_ganinverter_reader_ddp_prefix_and_strays(tmp_path, weights):
  """An encoder saved from DistributedDataParallel ('encoder.module.*')
  reads as the plain one; stray entries in ['encoder'] are refused."""
  src = _save_ganinverter(tmp_path / "plain.pt", weights)
  plain, avg, opts = e4e_converter.read_bundle(src, hfgi_converter.PARTS)
  ckpt = torch.load(src, weights_only=True)
  ckpt["encoder"] = {("encoder.module." + k[len("encoder."):]
                      if k.startswith("encoder.") else k): v
                     for k, v in ckpt["encoder"].items()}
  torch.save(ckpt, tmp_path / "ddp.pt")
  ddp, _, _ = e4e_converter.read_bundle(str(tmp_path / "ddp.pt"),
                                        hfgi_converter.PARTS)
  assert set(ddp) == set(plain) == {"encoder", "decoder", "grid_align",
                                    "residue"}
  assert set(ddp["encoder"]) == set(plain["encoder"]) == set(
      weights["encoder"])
  np.testing.assert_array_equal(np.asarray(avg), weights["latent_avg"])
  assert opts["resolution"] == 64
  ckpt["encoder"]["discriminator.w"] = torch.zeros(1)
  torch.save(ckpt, tmp_path / "stray.pt")
  with pytest.raises(e4e_converter.ConversionError,
                     match=r"other than encoder\.\* and latent_avg: "
                           r"discriminator\.w"):
    e4e_converter.read_bundle(str(tmp_path / "stray.pt"),
                              hfgi_converter.PARTS)
