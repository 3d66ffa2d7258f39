"""The comparison command on the synthetic ground-truth case: one embedding,
then embedding-only, PTI and DHR side by side (no downloaded weights)."""
import csv
import importlib.util
import os
import subprocess
import sys

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
# pivot the coarse inversion's.
_STEPS = (("data.synthetic.count", 1), ("batch_size", 1),
          ("compare.pti.feature_steps", 3), ("compare.pti.weight_steps", 3),
          ("compare.pti_embedding.steps", 2))
PTI = "PTI (W pivot)"


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
  # HFGI is left out: the demo configures no HFGI checkpoint.
  assert list(rows) == ["optim only", PTI, "DHR"]
  for row in rows.values():
    assert row["images"] == "1"
    for c in ("mse", "psnr", "lpips_alex", "lpips_vgg", "psnr_in",
              "psnr_out", "edit_psnr_in", "seconds"):
      assert np.isfinite(float(row[c])), (row["method"], c, row[c])
  md = open(os.path.join(workdir, "compare.md")).read().splitlines()
  assert md[0].startswith("| method | images | mse |")
  assert [l.split(" | ")[0] for l in md[2:]] == [
      "| optim only", "| " + PTI, "| DHR"]


def test_compare_reports_every_stage_and_step(compared):
  # The bar shows each stage of the batch and the steps of every compiled
  # loop (the first and the last always show): DSS's coarse inversion
  # (dss.coarse_steps = 2), PTI's W pivot (2) and refinement (3), DHR's
  # refinement (refine.feature_steps = 3), each method's under its title.
  err = compared[3]
  assert "compare" in err and "batch 1/1 (synthetic_0)" in err
  stages = ["coarse inversion step 0/2", "coarse inversion step 2/2",
            "segmentation", "embedding", "optim only: metrics",
            f"{PTI}: embedding step 0/2", f"{PTI}: embedding step 2/2",
            f"{PTI}: refinement step 1/3", f"{PTI}: refinement step 3/3",
            f"{PTI}: edits", "DHR: refinement step 1/3",
            "DHR: refinement step 3/3", "DHR: metrics", "DHR: edits",
            "writing"]
  at = [err.find(s) for s in stages]
  assert all(i >= 0 for i in at), [s for s, i in zip(stages, at) if i < 0]
  assert at == sorted(at), stages


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
  for method, title in (("embedding", "optim only"), ("pti", PTI),
                        ("dhr", "DHR")):
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
    png = np.asarray(Image.open(os.path.join(workdir, "synthetic_0",
                                             f"{method}.png")))[None]
    got = metrics.paper_metrics(png / np.float32(127.5) - 1, target)
    d = 2 / 255
    assert abs(got["mse"][0] - row["paper_mse"]) <= d * (
        2 * np.sqrt(row["paper_mse"]) + d), method


def test_refinement_beats_the_embedding_on_the_patch(compared):
  _, workdir, _, _ = compared
  rows = _table(workdir)
  f = lambda m, c: float(rows[m][c])
  # Measured (x86_64 Xeon, 2 cores, this test's settings: 32² stand-in,
  # 3 steps, one image): psnr_out optim-only 5.50, PTI (W pivot) 6.34, DHR
  # 7.89 dB; MSE 0.07435 / 0.08272 / 0.05759. Three steps of the feature
  # offset (lr 9e-2) move the patch by 2.4 dB, four times the 0.5 dB margin
  # and far above float32 round-off between CPUs (~1e-5 dB).
  assert f("DHR", "psnr_out") > f("optim only", "psnr_out") + 0.5
  assert f("DHR", "mse") < f("optim only", "mse")
  # PTI's W pivot is its own 2 steps at lr 5e-3 (the first at lr 0) from
  # latent_avg, not the coarse codes "optim only" shows, so no order
  # between the two is asserted.


def test_grid_has_a_titled_row_per_method(compared):
  config, workdir, _, _ = compared
  directory = os.path.join(workdir, "synthetic_0")
  for method in ("embedding", "pti", "dhr"):
    assert os.path.isfile(os.path.join(directory, f"{method}.png"))
  grid = np.asarray(Image.open(os.path.join(directory, "grid.png")))
  tile = pictures.upscale(np.zeros((32, 32, 3), np.uint8)).shape[1]
  strip = pictures.title_strip(["x"], [tile]).shape[0]
  row = strip + tile + 2  # a title strip, the tiles, 2 pixels apart
  titles = ["random -2", "random 2"]
  want = [["input", "mask (white = in-domain)"]] + [
      [f"{m} inversion"] + [f"{m} {t}" for t in titles]
      for m in ("optim only", PTI, "DHR")]
  assert grid.shape[0] == row * len(want)
  for k, names in enumerate(want):
    got = grid[k * row:k * row + strip, :len(names) * (tile + 2) - 2]
    assert np.array_equal(got, pictures.title_strip(names, [tile] * len(names)))


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
