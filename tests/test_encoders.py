"""pSp and ReStyle: golden parity through `converters.encoder` on torch.save'd
bundles, `load_encoder`, `restyle_invert`, and the refusals."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import dhr_jax
from conftest import rel_l2
from converters import encoder as encoder_converter
from dhr_jax.checkpoint import CheckpointError
from dhr_jax.models import encoders, ops

torch = pytest.importorskip("torch")

PSP_OPTS = {"encoder_type": "GradualStyleEncoder", "input_nc": 3,
            "output_size": 1024, "start_from_latent_avg": True}
RESTYLE_OPTS = {"encoder_type": "ProgressiveBackboneEncoder", "input_nc": 6,
                "output_size": 64, "start_from_latent_avg": True}

# Forward parity level of the issue. The float32 forward error of such
# networks is ~1e-6 relative (StyleGAN2: 5.8e-7 from float64, bench/
# float_precision.py; HFGI's IR stacks 2.6e-6–3.2e-6 from float64, see
# test_hfgi.py); the measured errors below (printed) are ~1e-6, so 1e-4
# leaves ≥ 30× for other CPUs, and a wrong layer, feature map or pooling is
# > 1e-2.
TOL = 1e-4


def _t(v):
  return v if isinstance(v, torch.Tensor) else torch.from_numpy(
      np.ascontiguousarray(v))


def _lazy(manifest):
  """A state dict in the manifest's layout of zero tensors that cost no
  memory (expand keeps one element, so torch.save writes a tiny file)."""
  fixed = manifest.get("fixed", {})  # the FIR blur kernels, kept real
  out = {}
  for k, shape, dtype in manifest["entries"]:
    if k in fixed:
      out[k] = torch.tensor(np.asarray(fixed[k], np.float32).reshape(shape))
      continue
    dt = torch.int64 if dtype == "int64" else torch.float32
    out[k] = torch.zeros((), dtype=dt).expand(tuple(shape))
  return out


def _save_released(path, encoder, decoder, latent_avg, opts):
  sd = {"encoder." + k: _t(v) for k, v in encoder.items()}
  sd.update({"decoder." + k: _t(v) for k, v in decoder.items()})
  bundle = {"state_dict": sd, "latent_avg": _t(latent_avg)}
  if opts is not None:
    bundle["opts"] = opts
  torch.save(bundle, path)
  return str(path)


def _save_ganinverter(path, encoder, decoder, latent_avg, opts):
  enc = {"encoder." + k: _t(v) for k, v in encoder.items()}
  enc["latent_avg"] = _t(latent_avg)
  torch.save({"encoder": enc, "decoder": {k: _t(v) for k, v in decoder.items()},
              "opts": opts, "global_step": 3}, path)
  return str(path)


def _cli(capsys, *args):
  code = encoder_converter.main([str(a) for a in args])
  out = capsys.readouterr()
  return code, out.out, out.err


def _nhwc(a):
  return jnp.asarray(np.transpose(a, (0, 2, 3, 1)))


@pytest.fixture(scope="module")
def restyle_weights(rule, golden):
  manifest, ref = golden("restyle_e4e_64")
  g_manifest, _ = golden("stylegan2_64")
  return dict(encoder=rule.state_dict_from_manifest(manifest),
              decoder=rule.state_dict_from_manifest(g_manifest),
              latent_avg=ref["latent_avg"], ref=ref, manifest=manifest)


@pytest.fixture(scope="module")
def restyle_dir(restyle_weights, tmp_path_factory):
  """The golden ReStyle bundle (released layout) through the CLI."""
  tmp = tmp_path_factory.mktemp("restyle")
  w = restyle_weights
  src = _save_released(tmp / "restyle_e4e_64.pt", w["encoder"], w["decoder"],
                       w["latent_avg"], RESTYLE_OPTS)
  assert encoder_converter.main(["--src", src, "--dst",
                                 str(tmp / "ckpt")]) == 0
  return tmp / "ckpt"


def test_expected_shapes_match_released_layouts(golden):
  for name, arch, n in (("psp_ir_se50", "psp", 18),
                        ("restyle_e4e_64", "restyle", 10)):
    manifest, _ = golden(name)
    released = {k: tuple(s) for k, s, d in manifest["entries"]
                if not k.endswith("num_batches_tracked")}
    assert encoder_converter.expected_shapes(arch, n) == released


# The ReStyle fixture's stand-in network is badly conditioned (measured
# with float64 runs of ours and of the official code, which agree to 3e-8):
# a 1e-6 relative change of its input moves the encoder's output by 6e-5 at
# iteration 0, 7e-4 at iteration 1 and 8e-3 at iteration 2. Float32 rounding
# alone therefore puts the OFFICIAL code, run in float32 on this CPU, 5.4e-4
# (delta_0), 6.0e-3 (delta_1, from the fixture's image_0) and 1.4e-1
# (delta_2) away from the fixture, and the fixture's own deltas are 2.0e-4,
# 8.7e-4 and 1.4e-1 from the exact (float64) values. No float32
# implementation meets 1e-4 there, and iterations chained through the
# generator diverge (ours: codes_1 2.7e-1 from the fixture). Tested instead:
# iteration 0 end to end (ours: codes_0 8.9e-4, image_0 2.3e-3 measured;
# 1e-2 is ~10x the official code's own spread), one step of iteration 1
# from the fixture's image_0 (ours 4.2e-3, official 6.0e-3; 3e-2 = 5x), and
# that restyle_invert's iteration 1 is that step on its own image_0 (4e-8
# here, where both run the same XLA program; other fusions can move it by
# the float32 spread of iteration 1, 3.4e-3 from float64: 3e-2). A wrong layer, pooling or iteration rule is
# O(1) off. Iteration 2 of the fixture is float32 noise (14%): not compared.
RESTYLE_TOL_0 = 1e-2
RESTYLE_TOL_STEP = 3e-2


def test_restyle_golden_parity(restyle_dir, restyle_weights, capsys):
  ref = restyle_weights["ref"]
  E = dhr_jax.load_encoder(restyle_dir)
  G = dhr_jax.load_generator(restyle_dir)
  assert E.config["arch"] == "restyle" and E.config["n_latent"] == 10
  np.testing.assert_array_equal(np.asarray(E.latent_avg), ref["latent_avg"])
  x = _nhwc(ref["input"])
  codes, images = dhr_jax.restyle_invert(E, G, x, iterations=2)
  assert codes.shape == (2, 2, 10, 512)
  assert images.shape == (2, 2, 64, 64, 3)
  errs = {"codes_0": rel_l2(codes[0], ref["codes_0"]),
          "delta_0": rel_l2(codes[0] - ref["latent_avg"], ref["delta_0"]),
          "image_0": rel_l2(images[0], np.transpose(ref["image_0"],
                                                    (0, 2, 3, 1)))}

  def step(previous):  # one ReStyle step through the public encode
    pooled = ops.adaptive_avg_pool(jnp.asarray(previous), 256)
    return E.encode(E.params, jnp.concatenate([x, pooled], axis=-1),
                    add_latent_avg=False)
  errs["delta_1 (from the fixture's image_0)"] = rel_l2(
      step(np.transpose(ref["image_0"], (0, 2, 3, 1))), ref["delta_1"])
  errs["our iteration 1 vs step(our image_0)"] = rel_l2(
      codes[1] - codes[0], step(images[0]))
  with capsys.disabled():
    print("\nrestyle parity:", ", ".join(f"{k} {v:.1e}"
                                          for k, v in errs.items()))
  assert max(errs["codes_0"], errs["delta_0"],
             errs["image_0"]) <= RESTYLE_TOL_0, errs
  assert errs["delta_1 (from the fixture's image_0)"] <= RESTYLE_TOL_STEP
  assert errs["our iteration 1 vs step(our image_0)"] <= RESTYLE_TOL_STEP


def test_restyle_avg_image_and_pooling(restyle_dir, restyle_weights):
  """The start image is G(latent_avg); AdaptiveAvgPool2d(256) on 64²
  repeats every pixel 4×4 (the windows [floor(4i/16)...) hold one pixel)."""
  ref = restyle_weights["ref"]
  G = dhr_jax.load_generator(restyle_dir)
  avg = G.synthesis(G.params, jnp.asarray(ref["latent_avg"])[None])
  assert rel_l2(avg, np.transpose(ref["avg_image"], (0, 2, 3, 1))) <= TOL
  x = np.random.RandomState(0).randn(1, 64, 64, 3).astype(np.float32)
  pooled = torch.nn.AdaptiveAvgPool2d((256, 256))(
      torch.from_numpy(x.transpose(0, 3, 1, 2))).numpy().transpose(0, 2, 3, 1)
  ours = np.asarray(ops.adaptive_avg_pool(jnp.asarray(x), 256))
  np.testing.assert_array_equal(ours, np.repeat(np.repeat(x, 4, 1), 4, 2))
  np.testing.assert_array_equal(ours, pooled)


@pytest.mark.slow  # a 1024² decoder in the bundle, as e4e's 1024² test
def test_psp_golden_parity(tmp_path, rule, golden, capsys):
  """Released pSp layout (1024² decoder: zeros, only its layout matters
  here) → CLI → load_encoder → encode."""
  manifest, ref = golden("psp_ir_se50")
  g_manifest, _ = golden("stylegan2_1024")
  src = _save_released(tmp_path / "psp_ffhq_encode.pt",
                       rule.state_dict_from_manifest(manifest),
                       _lazy(g_manifest), ref["latent_avg"], PSP_OPTS)
  code, out, err = _cli(capsys, "--src", src, "--dst", tmp_path / "ckpt")
  assert code == 0, err
  assert "pSp (GradualStyleEncoder)" in out and "opts['encoder_type']" in out
  E = dhr_jax.load_encoder(tmp_path / "ckpt")
  assert E.config["arch"] == "psp" and E.config["n_latent"] == 18
  x = _nhwc(ref["input"])
  err_codes = rel_l2(E.encode(E.params, x, add_latent_avg=False), ref["codes"])
  err_plus = rel_l2(E.encode(E.params, x), ref["codes_plus_avg"])
  with capsys.disabled():
    print(f"\npsp parity: codes {err_codes:.1e}, codes_plus_avg "
          f"{err_plus:.1e}")
  assert err_codes <= TOL and err_plus <= TOL


def test_ganinverter_layout_and_arch_check(tmp_path, restyle_weights,
                                           restyle_dir, capsys):
  """GANInverter's layout converts to the same tree; --arch refuses another
  encoder naming both."""
  w = restyle_weights
  src = _save_ganinverter(tmp_path / "restyle_gi.pt", w["encoder"],
                          w["decoder"], w["latent_avg"],
                          dict(RESTYLE_OPTS, resolution=64))
  code, out, err = _cli(capsys, "--src", src, "--dst", tmp_path / "gi",
                        "--arch", "restyle")
  assert code == 0, err
  assert "ReStyle (ProgressiveBackboneEncoder)" in out
  a = encoders.load(tmp_path / "gi", arch="restyle")
  b = encoders.load(restyle_dir)
  for x, y in zip(*(jax.tree_util.tree_leaves(t.params) for t in (a, b))):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  code, _, err = _cli(capsys, "--src", src, "--dst", tmp_path / "no",
                      "--arch", "e4e")
  assert code == 2 and len(err.strip().splitlines()) == 1
  assert "holds a ReStyle (ProgressiveBackboneEncoder) encoder" in err
  assert "expected e4e (Encoder4Editing)" in err
  assert not (tmp_path / "no" / "restyle").exists()


@pytest.mark.parametrize("encoder_type", ["ResNetProgressiveBackboneEncoder",
                                          "BackboneEncoder"])
def test_refuses_unbuilt_encoder_types(tmp_path, capsys, encoder_type,
                                       golden):
  manifest, _ = golden("restyle_e4e_64")
  src = _save_released(tmp_path / "x.pt", _lazy(manifest),
                       {"style.1.weight": torch.zeros(2, 2)},
                       np.zeros((10, 512), np.float32),
                       dict(RESTYLE_OPTS, encoder_type=encoder_type))
  code, _, err = _cli(capsys, "--src", src, "--dst", tmp_path / "out")
  assert code == 2 and len(err.strip().splitlines()) == 1
  assert f"{encoder_type!r}" in err and "does not build" in err


def test_e4e_bundle_given_as_restyle(tmp_path, capsys, golden):
  manifest, _ = golden("e4e_ir_se50")
  encoder = {k: v for k, v in _lazy(manifest).items()
             if not k.startswith("styles.") or int(k.split(".")[1]) < 10}
  src = _save_released(tmp_path / "e4e.pt", encoder,
                       {"style.1.weight": torch.zeros(2, 2)},
                       np.zeros((10, 512), np.float32),
                       {"encoder_type": "Encoder4Editing",
                        "stylegan_size": 64})
  code, _, err = _cli(capsys, "--src", src, "--dst", tmp_path / "out",
                      "--arch", "restyle")
  assert code == 2 and len(err.strip().splitlines()) == 1
  assert ("holds an e4e (Encoder4Editing) encoder (from "
          "opts['encoder_type'] = 'Encoder4Editing'), expected ReStyle "
          "(ProgressiveBackboneEncoder)") in err
  assert not (tmp_path / "out" / "restyle").exists()


def test_e4e_psp_without_opts_needs_arch(tmp_path, capsys, golden):
  manifest, _ = golden("psp_ir_se50")
  src = _save_released(tmp_path / "x.pt", _lazy(manifest),
                       {"style.1.weight": torch.zeros(2, 2)},
                       np.zeros((18, 512), np.float32), None)
  code, _, err = _cli(capsys, "--src", src, "--dst", tmp_path / "out")
  assert code == 2 and "--arch e4e or --arch psp" in err


def _config_only(arch, size):
  """An encoder with its config but no weights: the checks read only it."""
  from dhr_jax.models import e4e
  config = encoders.make_config(arch, size)
  return e4e.Encoder(params={}, config=config,
                     latent_avg=np.zeros((config["n_latent"], 512)))


def test_wrong_encoder_or_generator_is_one_line(restyle_dir, tmp_path):
  """An e4e encoder given to ReStyle, or an encoder for another generator
  size: one error naming what was found and what was expected."""
  G = dhr_jax.load_generator(restyle_dir)
  x = jnp.zeros((1, 256, 256, 3), jnp.float32)
  e4e_E = _config_only("e4e", 64)
  with pytest.raises(CheckpointError) as e:
    dhr_jax.restyle_invert(e4e_E, G, x, iterations=1)
  assert "e4e (Encoder4Editing), expected ReStyle" in str(e.value)
  psp_E = _config_only("psp", 128)
  with pytest.raises(CheckpointError) as e:
    encoders.check_compatible(psp_E, G, "psp")
  msg = str(e.value)
  assert "\n" not in msg and "12×512" in msg and "64² generator" in msg
  with pytest.raises(CheckpointError) as e:
    encoders.load(restyle_dir, arch="psp")
  assert "holds a ReStyle (ProgressiveBackboneEncoder) encoder, expected " \
         "pSp (GradualStyleEncoder)" in str(e.value)
