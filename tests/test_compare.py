"""The comparison command on the synthetic ground-truth case: DSS once, the
shared embedding and the demo's stand-in e4e, pSp and ReStyle encoders and
HFGI, then the paper's Table 1 rows side by side (no downloaded weights)."""
import csv
import importlib.util
import os
import subprocess
import sys

import ml_collections
import numpy as np
from PIL import Image
import pytest

from dhr_jax import compare
from dhr_jax import edits as edits_lib
from dhr_jax import pictures
from dhr_jax import runner as run_lib
from dhr_jax import synthetic
from tests.test_cli import _TINY

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COMPARE = os.path.join(REPO, "configs", "compare.py")
_spec = importlib.util.spec_from_file_location("compare_config", COMPARE)
compare_config = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(compare_config)

# test_cli's 32² demo with one image; PTI gets DHR's step count, its W
# pivot the coarse inversion's. Of the demo's stand-in encoders e4e (HFGI
# consults its codes) and ReStyle (pSp's rows are e4e's code path: ~12 s of
# compilation saved); the demo's stand-in HFGI.
_STEPS = (("data.synthetic.count", 1), ("batch_size", 1),
          ("compare.pti.feature_steps", 3), ("compare.pti.weight_steps", 3),
          ("compare.pti_embedding.steps", 2),
          ("compare.encoders", "e4e=stand-in,restyle=stand-in"))
PTI = "PTI (W pivot)"
# The demo's Table 1 layout.
ROWS = ["optim only", "e4e only", "ReStyle", PTI, "HFGI (e4e)",
        "DHR (optim)", "DHR (e4e)"]
KEYS = ["embedding", "embedding@e4e", "embedding@restyle", "pti", "hfgi@e4e",
        "dhr", "dhr@e4e"]


@pytest.fixture(scope="module")
def compared(tmp_path_factory):
  config = compare_config.get_config("demo")
  config.update_from_flattened_dict(dict(_TINY + _STEPS))
  base = tmp_path_factory.mktemp("compare")
  workdir = str(base / "out")
  # The progress bar writes to stderr; keep what it wrote.
  saved = sys.stderr
  with open(base / "stderr.txt", "w") as f:
    sys.stderr = f
    try:
      status = run_lib.main(config, workdir, "compare")
    finally:
      sys.stderr = saved
  return config, workdir, status, (base / "stderr.txt").read_text()


def _table(workdir):
  with open(os.path.join(workdir, "compare.csv")) as f:
    return {r["method"]: r for r in csv.DictReader(f)}


def test_compare_writes_a_row_per_method(compared):
  _, workdir, status, _ = compared
  assert status == 0
  rows = _table(workdir)
  assert list(rows) == ROWS
  for row in rows.values():
    assert row["images"] == "1"
    for c in ("mse", "psnr", "lpips_alex", "lpips_vgg", "psnr_in",
              "psnr_out", "edit_psnr_in", "seconds"):
      assert np.isfinite(float(row[c])), (row["method"], c, row[c])
  md = open(os.path.join(workdir, "compare.md")).read().splitlines()
  assert md[0].startswith("| method | images | mse |")
  assert [l.split(" | ")[0] for l in md[2:]] == ["| " + r for r in ROWS]


def test_compare_reports_every_stage_and_step(compared):
  # The bar shows each stage of the batch and the steps of every compiled
  # loop (the first and the last always show): DSS's coarse inversion
  # (dss.coarse_steps = 2), each encoder's embedding (once: DHR (pSp)
  # reuses pSp's), PTI's W pivot (2) and refinement (3), DHR's refinement
  # (refine.feature_steps = 3), each method's under its title.
  err = compared[3]
  assert "compare" in err and "batch 1/1 (synthetic_0)" in err
  stages = ["coarse inversion step 0/2", "coarse inversion step 2/2",
            "segmentation", "embedding", "optim only: metrics",
            "e4e only: embedding",
            "ReStyle: embedding", "ReStyle: metrics",
            f"{PTI}: embedding step 0/2", f"{PTI}: embedding step 2/2",
            f"{PTI}: refinement step 1/3", f"{PTI}: refinement step 3/3",
            f"{PTI}: edits", "HFGI (e4e): metrics",
            "DHR (optim): refinement step 1/3",
            "DHR (optim): refinement step 3/3", "DHR (optim): metrics",
            "DHR (optim): edits", "DHR (e4e): refinement step 3/3",
            "writing"]
  at = [err.find(s) for s in stages]
  assert all(i >= 0 for i in at), [s for s, i in zip(stages, at) if i < 0]
  assert at == sorted(at), stages
  # Each encoder embeds once per batch: HFGI (e4e) and DHR (e4e) start
  # from e4e only's.
  assert "HFGI (e4e): embedding" not in err
  assert "DHR (e4e): embedding" not in err


def test_paper_metrics_columns(compared):
  """compare.csv/md carry the paper's protocol beside the float metrics,
  from the method's inversion and the input file."""
  from dhr_jax import metrics
  _, workdir, _, _ = compared
  rows = _table(workdir)
  md = open(os.path.join(workdir, "compare.md")).read().splitlines()
  assert "| lpips_vgg | paper_mse | paper_psnr | paper_lpips_alex |" in md[0]
  target = np.asarray(Image.open(os.path.join(workdir, "inputs",
                                              "synthetic_0.png")))[None]
  for method, title in zip(KEYS, ROWS):
    row = {c: float(rows[title][c]) for c in
           ("paper_mse", "paper_psnr", "paper_lpips_alex")}
    # One image: the mean PSNR is the PSNR of the mean MSE (csv: 6 digits).
    assert row["paper_psnr"] == pytest.approx(
        10 * np.log10(2 / row["paper_mse"]), abs=1e-3)
    assert 0 < row["paper_lpips_alex"] < 2
    # The float inversion is not saved, only <method>.png, rounded where the
    # paper truncates: each pixel of the picture the paper scores is within
    # one level δ = 2/255 of the png's, before and after the (convex)
    # resize, so |MSE_png − MSE| ≤ δ·(2·√MSE + δ).
    png = np.asarray(Image.open(os.path.join(
        workdir, "synthetic_0", compare.png_name(method))))[None]
    got = metrics.paper_metrics(png / np.float32(127.5) - 1, target)
    d = 2 / 255
    assert abs(got["mse"][0] - row["paper_mse"]) <= d * (
        2 * np.sqrt(row["paper_mse"]) + d), method


def test_refinement_beats_the_embedding_on_the_patch(compared):
  _, workdir, _, _ = compared
  rows = _table(workdir)
  f = lambda m, c: float(rows[m][c])
  # Measured (x86_64 Xeon, 2 cores, this test's settings: 32² stand-in,
  # 3 steps, one image; main and this branch alike, 2026-12-06): psnr_out
  # optim-only 5.50, PTI (W pivot) 6.34, DHR 7.29 dB; MSE 0.07435 / 0.08272
  # / 0.06052 (an older measurement said 7.89 dB and 0.05759). Three steps
  # of the feature offset (lr 9e-2) move the patch by 1.8 dB, 3.6 times the
  # 0.5 dB margin and far above float32 round-off between CPUs (~1e-5 dB).
  assert f("DHR (optim)", "psnr_out") > f("optim only", "psnr_out") + 0.5
  assert f("DHR (optim)", "mse") < f("optim only", "mse")
  # PTI's W pivot is its own 2 steps at lr 5e-3 (the first at lr 0) from
  # latent_avg, not the coarse codes "optim only" shows, so no order
  # between the two is asserted.


def test_grid_has_a_titled_row_per_method(compared):
  config, workdir, _, _ = compared
  directory = os.path.join(workdir, "synthetic_0")
  for method in KEYS:
    assert os.path.isfile(os.path.join(directory, compare.png_name(method)))
  grid = np.asarray(Image.open(os.path.join(directory, "grid.png")))
  tile = pictures.upscale(np.zeros((32, 32, 3), np.uint8)).shape[1]
  strip = pictures.title_strip(["x"], [tile]).shape[0]
  row = strip + tile + 2  # a title strip, the tiles, 2 pixels apart
  titles = ["random -2", "random 2"]
  want = [["input", "mask (white = in-domain)"]] + [
      [f"{m} inversion"] + [f"{m} {t}" for t in titles]
      for m in ROWS]
  assert grid.shape[0] == row * len(want)
  for k, names in enumerate(want):
    got = grid[k * row:k * row + strip, :len(names) * (tile + 2) - 2]
    assert np.array_equal(got, pictures.title_strip(names, [tile] * len(names)))


def test_hfgi_row_refines_the_e4e_inversion(compared):
  """The stand-in HFGI changes the e4e inversion it consults, a little."""
  _, workdir, _, _ = compared
  read = lambda m: np.asarray(Image.open(os.path.join(
      workdir, "synthetic_0", compare.png_name(m))), np.float64) / 127.5 - 1
  hfgi, e4e = read("hfgi@e4e"), read("embedding@e4e")
  close = 10 * np.log10(4 / np.mean((hfgi - e4e) ** 2))
  # Measured (this fixture: 32² stand-in, head scale 0.01, x86_64 Xeon,
  # 2026-12-06): 33.2 dB PSNR between the two pngs, the largest pixel
  # difference 26 levels; the float images with 3× the head scale 24.2 dB,
  # with a third of it 43.5 dB, with zero heads equal (below). Float32
  # round-off between CPUs moves this by ~1e-5 dB.
  assert 28 < close < 40, close


def test_stand_in_hfgi_hooks_the_demo_generator():
  """synthetic.stand_in_hfgi is the released architecture sized for the
  stand-in generator: scale and shift are its hooked feature's shape, and
  with zero heads HFGI's image is the plain render."""
  import jax
  from dhr_jax import loading
  from dhr_jax.models import hfgi
  from dhr_jax.models.stylegan2 import feature_modulation, official_channels
  config = compare_config.get_config("demo")
  config.update_from_flattened_dict(dict(_TINY))
  G = loading.load_generator(config)
  H = synthetic.stand_in_hfgi(G, config.model.stand_in.seed, head_scale=0.0)
  # 32²: the size/16 analogue is below the generator's smallest feature,
  # so 4², right after the 4² convolution (k = 1), 16 channels.
  assert H.config == hfgi.HFGIConfig(input_size=32, feature_idx=1,
                                     condition_channels=16)
  assert H.config.residue_down[-1] == (64, 64)  # 32² → 4²: three stages
  # The same rule gives the released checkpoint's architecture at 1024².
  channels = {str(r): c for r, c in official_channels(1024).items()}
  assert hfgi.config_for(1024, channels) == hfgi.OFFICIAL
  # Stages of stride 2 cannot take 48² to 4².
  with pytest.raises(ValueError, match="power-of-two multiple"):
    hfgi.HFGIConfig(input_size=48, feature_idx=1, condition_channels=16)
  rng = np.random.RandomState(0)
  codes = np.asarray(G.latent_avg)[None, None] + 0.3 * rng.standard_normal(
      (1, G.n_latent, G.config["style_dim"])).astype(np.float32)
  x = rng.uniform(-1, 1, (1, 32, 32, 3)).astype(np.float32)
  out = hfgi.hfgi_forward(G, H, codes, x)
  assert out["image"].shape == (1, 32, 32, 3)
  k = H.config.feature_idx
  plain, feature = G.synthesis(G.params, codes, feature_idx=k,
                               return_feature=True)
  assert out["scale"].shape == out["shift"].shape == feature.shape
  # The hook itself is exact: zero conditions give the plain render bit
  # for bit, op by op.
  hooked = G.synthesis(G.params, codes, feature_idx=k,
                       feature_fn=feature_modulation(out["scale"],
                                                     out["shift"]))
  np.testing.assert_array_equal(np.asarray(hooked), np.asarray(plain))
  # HFGI's compiled program rounds differently from the eager render:
  # measured 1.4e-6 max abs here (images up to 4.2: a few float32 ulps;
  # 2.6e-6 at the demo's 64², where the plain render compiled alone is
  # 2.9e-6 from the eager one). 2e-5 is 14× that; the demo's head scale
  # (0.01) moves the image by 0.21.
  image = hfgi.hfgi_invert(G, H, codes, x)
  np.testing.assert_allclose(np.asarray(image), np.asarray(plain), rtol=0,
                             atol=2e-5)


def test_pti_pivot_is_named_and_checked():
  """PTI's default pivot is its own W optimisation (configs/pti.py's
  embedding, GANInverter's pti_pivot.yaml); the shared embedding is the
  named variant, and each is titled as what it is."""
  config = compare_config.get_config()
  assert config.compare.pti_pivot == "w"
  e = config.compare.pti_embedding
  assert (e.method, e.init, e.space, e.steps, e.lr, e.mse_lambda) == (
      "optim", "latent_avg", "w", 450, 5e-3, 0.0)
  assert compare.method_title("pti", config) == "PTI (W pivot)"
  config.compare.pti_pivot = "embedding"
  assert compare.method_title("pti", config) == "PTI (e4e pivot)"
  demo = compare_config.get_config("demo")
  assert demo.compare.pti_embedding.steps == demo.dss.coarse_steps == 40
  demo.compare.pti_pivot = "embedding"
  assert compare.method_title("pti", demo) == "PTI (optim pivot)"
  demo.compare.pti_pivot = "e4e"
  with pytest.raises(run_lib.UserError, match="pti_pivot"):
    compare.validate(demo)
  demo.compare.pti_pivot = "w"
  demo.compare.pti_embedding.init = "coarse"
  with pytest.raises(run_lib.UserError, match="pti_embedding"):
    compare.validate(demo)


def test_table1_layout_and_titles(monkeypatch):
  """Without config.compare.encoders the rows are today's, from the run's
  own embedding; with them the paper's Table 1 layout, HFGI on the e4e
  entry's codes (left out with one warning without an e4e encoder) and no
  DHR row for ReStyle."""
  from types import SimpleNamespace as NS
  demo = compare_config.get_config("demo").compare.encoders
  assert demo == "e4e=stand-in,psp=stand-in,lsap=stand-in,restyle=stand-in"
  config = compare_config.get_config()
  methods = ("embedding", "pti", "hfgi", "dhr")
  own = NS(config={"arch": "e4e"})
  models = NS(encoders={}, encoder=own, hfgi=object())
  titles = lambda keys, archs: [compare.method_title(k, config, archs)
                                for k in keys]
  keys, archs = compare.table1_methods(config, methods, models)
  assert keys == list(methods) and archs == {}
  assert titles(keys, archs) == ["e4e only", PTI, "HFGI", "DHR"]
  config.compare.encoders = "e4e=a,psp=b,lsap=c,restyle=d"
  models.encoders = dict(e4e=own, psp=NS(config={"arch": "psp"}),
                         lsap=NS(config={}),  # an e4e (GANInverter's LSAP)
                         restyle=NS(config={"arch": "restyle"}))
  keys, archs = compare.table1_methods(config, methods, models)
  assert titles(keys, archs) == [
      "e4e only", "pSp only", "LSAP only", "ReStyle", PTI, "HFGI (e4e)",
      "DHR (e4e)", "DHR (pSp)", "DHR (LSAP)"]
  assert keys[5:7] == ["hfgi@e4e", "dhr@e4e"]
  assert compare.png_name("dhr@lsap") == "dhr_lsap.png"
  warnings = []
  monkeypatch.setattr(compare.logging, "warning",
                      lambda msg, *a: warnings.append(msg % a))
  config.embedding.method = "psp"
  models.encoder = NS(config={"arch": "psp"})
  del models.encoders["e4e"]
  keys, archs = compare.table1_methods(config, methods, models)
  assert titles(keys, archs) == [
      "pSp only", "pSp only", "LSAP only", "ReStyle", PTI, "DHR (pSp)",
      "DHR (pSp)", "DHR (LSAP)"]
  assert len(warnings) == 1 and "HFGI left out" in warnings[0]
  # The demo's stand-in HFGI without encoders has no e4e codes to consult:
  # left out the same way.
  demo = compare_config.get_config("demo")
  assert demo.model.hfgi == "stand-in" and compare.validate(demo)
  demo.compare.encoders = ""
  compare.validate(demo)
  keys, _ = compare.table1_methods(demo, methods, models)
  assert keys == ["embedding", "pti", "dhr"]
  assert len(warnings) == 2 and "HFGI left out" in warnings[1]
  assert "(e4e=stand-in)" in warnings[1] and "(e4e=DIR)" in warnings[0]


def test_compare_encoders_refusals_and_missing_folder(monkeypatch, tmp_path):
  """config.compare.encoders: malformed entries and stand-ins outside the
  demo are refused in one line; a folder that does not exist leaves its
  encoder out with one warning naming it and its converter."""
  from types import SimpleNamespace as NS
  from dhr_jax import loading
  config = compare_config.get_config()
  for value, match in (("psp", "is not name=DIR"), ("a b=x", "not a name"),
                       ("psp=x,psp=y", "named twice"),
                       ("psp=stand-in", "stand-in generator")):
    config.compare.encoders = value
    with pytest.raises(run_lib.UserError, match=match):
      compare.validate(config)
  config.compare.encoders, config.model.hfgi = "", "stand-in"
  with pytest.raises(run_lib.UserError, match="stand-in HFGI is the stand-in"):
    compare.validate(config)
  # Nor do library calls build it for a converted generator.
  with pytest.raises(run_lib.UserError, match="stand-in HFGI is the stand-in"):
    loading.load_hfgi(config, None)
  config.compare.methods = "embedding,dhr"  # no HFGI row: nothing to refuse
  compare.validate(config)
  config.model.hfgi, config.compare.methods = "", "embedding,pti,hfgi,dhr"
  warnings = []
  monkeypatch.setattr(loading.logging, "warning",
                      lambda msg, *a: warnings.append(msg % a))
  missing = str(tmp_path / "lsap_ffhq")
  config.compare.encoders = f"lsap={missing}"
  assert loading.load_compare_encoders(
      config, NS(G=None, encoder=None, mesh=None)) == {}
  assert len(warnings) == 1, warnings
  assert "'lsap' left out" in warnings[0] and missing in warnings[0]
  assert "converters.encoder" in warnings[0]


def test_encoder_embeddings(compared):
  """embedding.method='restyle' gives ReStyle's last iteration
  (restyle_iterations), 'psp' refuses another encoder in one line. On the
  fixture's generator and stand-in, whose programs it compiled."""
  from types import SimpleNamespace as NS
  import jax
  import jax.numpy as jnp
  from dhr_jax import loading
  from dhr_jax import pipeline
  from dhr_jax.models import encoders
  config = ml_collections.ConfigDict(compared[0].to_dict())
  # Placed as the run places them, so that its compiled programs serve.
  mesh = loading.make_mesh()
  put = lambda a, *spec: jax.device_put(a, jax.sharding.NamedSharding(
      mesh, jax.sharding.PartitionSpec(*spec)))
  G = put(loading.load_generator(config))
  E = put(synthetic.stand_in_encoder(G, "restyle",
                                     config.model.stand_in.seed))
  x = put(jnp.asarray(np.random.RandomState(0).uniform(
      -1, 1, (1, 32, 32, 3)), jnp.float32), "batch")
  config.embedding.update(method="restyle", restyle_iterations=2)
  codes, image = pipeline.embed(NS(G=G, encoder=E), config.embedding, x,
                                ["a"], 0)
  want = encoders.restyle_invert(E, G, x, iterations=2)
  np.testing.assert_array_equal(np.asarray(codes), np.asarray(want[0][-1]))
  assert image.shape == (1, 32, 32, 3)
  config.embedding.method = "psp"
  with pytest.raises(pipeline.PipelineError) as e:
    pipeline.embed(NS(G=G, encoder=E), config.embedding, x, ["a"], 0)
  assert "\n" not in str(e.value)
  assert "is ReStyle (ProgressiveBackboneEncoder), expected pSp" in str(
      e.value)
  # The demo's LSAP stand-in is an e4e network (as GANInverter ships LSAP)
  # with weights of its own, not a second copy of the e4e stand-in.
  seed = config.model.stand_in.seed
  lsap, e4e = (synthetic.stand_in_encoder(G, n, seed) for n in ("lsap", "e4e"))
  assert encoders.arch_of(lsap) == "e4e"
  assert jax.tree.structure(lsap) == jax.tree.structure(e4e)
  assert not any(np.array_equal(a, b) for a, b in zip(
      jax.tree.leaves(lsap.params), jax.tree.leaves(e4e.params))
                 if np.asarray(a).std() > 0)


def test_compare_refuses_an_unknown_method(tmp_path):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  p = subprocess.run(
      [sys.executable, os.path.join(REPO, "run.py"),
       "--config=" + COMPARE + ":demo", "--workdir=" + str(tmp_path / "o"),
       "--config.compare.methods=dhr,nope"],
      capture_output=True, text=True, cwd=str(tmp_path), env=env,
      timeout=300)
  assert p.returncode == 2, p.stderr[-2000:]
  lines = [l for l in p.stderr.splitlines() if l.strip()]
  assert len(lines) == 1 and "config.compare.methods" in lines[0]
  assert "'nope'" in lines[0] and "embedding, pti, hfgi, dhr" in lines[0]
  assert not (tmp_path / "o").exists()



def test_edit_fidelity_against_the_true_edits():
  """edit_psnr_in compares an image's edits with G(e(w_true)) outside the
  patch: the true edits themselves score exactly (inf), the edits of other
  codes finitely, and what is inside the patch does not count."""
  import jax
  from dhr_jax.models.stylegan2 import init_generator
  G = init_generator(jax.random.PRNGKey(0), size=16, style_dim=32, n_mlp=1,
                     channels=8)
  _, truth = synthetic.synthetic_case(G, 0, 0)
  direction = np.random.RandomState(0).randn(32).astype(np.float32)
  edits = [edits_lib.interfacegan("d", direction, [-1.0, 1.0])]
  true = edits_lib.generator_edits(G, truth.codes[None], edits)
  assert sorted(true) == ["d_-1", "d_1"]
  assert synthetic.edit_fidelity(G, truth, edits, true) == {
      "edit_psnr_in": float("inf")}
  spoiled = {l: np.where(truth.out[..., None], 5.0, im)
             for l, im in true.items()}
  assert synthetic.edit_fidelity(G, truth, edits, spoiled) == {
      "edit_psnr_in": float("inf")}
  other = edits_lib.generator_edits(G, truth.codes[None] + 0.5, edits)
  got = synthetic.edit_fidelity(G, truth, edits, other)["edit_psnr_in"]
  assert np.isfinite(got) and got > 0
  assert synthetic.edit_fidelity(G, truth, [], {}) == {}
