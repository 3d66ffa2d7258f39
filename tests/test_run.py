"""run.py end to end on CPU with a tiny e4e bundle made by the real converters.

The generator is a 32² StyleGAN2 with seeded random weights; the encoder has
the released e4e layout with zero weights (so it predicts latent_avg for
every image), both converted from a torch.save'd bundle by converters.e4e.
Steps are cut to a handful so that the whole module runs in a few minutes;
the runs share compiled functions through jit's caches.
"""
import glob
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from PIL import Image

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from conftest import rel_l2  # noqa: E402
from dhr_jax import editing  # noqa: E402
from dhr_jax import edits as edits_lib  # noqa: E402
from dhr_jax import files as files_lib  # noqa: E402
from dhr_jax import io  # noqa: E402
from dhr_jax import loading  # noqa: E402
from dhr_jax import methods  # noqa: E402
from dhr_jax import pipeline  # noqa: E402
from dhr_jax import runner as run_lib  # noqa: E402
from dhr_jax.config_files import load_config  # noqa: E402

# The batch refinement, for stand-ins that wrap it (monkeypatched in). It is
# patched where the runner calls it, in Python: `refine.hybrid_refine` runs
# inside a jitted function, so patching it does nothing once an earlier test
# has compiled that function for the same shapes.
_refine_batch = pipeline._refine

GOOD = ("a_rgb", "b_gray", "c_rgba", "e_wide")


def _dhr_config():
  return load_config(os.path.join(REPO, "configs", "dhr.py"))


def _make_bundle(directory):
  """Tiny e4e bundle through converters.e4e: 32² generator, zero encoder."""
  import jax
  import torch
  from converters import e4e as e4e_converter
  from converters import stylegan2 as g_converter
  from dhr_jax.models import e4e
  from dhr_jax.models.stylegan2 import init_generator
  G = init_generator(jax.random.PRNGKey(0), size=32, style_dim=512, n_mlp=2,
                     channels=16)
  n = e4e.style_count(32)
  state = {"encoder." + k: torch.zeros(()).expand(s)  # tiny on disk
           for k, s in e4e_converter.expected_shapes(n).items()}
  state.update({"decoder." + k: torch.from_numpy(np.array(v))
                for k, v in g_converter.to_torch_state_dict(
                    G.params, G.noise).items()})
  avg = np.tile(np.asarray(G.latent_avg)[None], (n, 1))
  src = os.path.join(directory, "e4e_tiny.pt")
  torch.save({"state_dict": state, "latent_avg": torch.from_numpy(avg),
              "opts": {"encoder_type": "Encoder4Editing",
                       "stylegan_size": 32}}, src)
  dst = os.path.join(directory, "bundle")
  e4e_converter.convert(src, dst)
  os.remove(src)
  return dst


def _smooth(rng, h, w):
  """A smooth random RGB picture (uint8)."""
  small = rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)
  return np.asarray(Image.fromarray(small).resize((w, h), Image.BILINEAR))


def make_inputs(directory):
  """Four good input files and two that are not images (public: bench/
  float_precision.py refines the same inputs)."""
  rng = np.random.default_rng(0)
  os.makedirs(directory)
  Image.fromarray(_smooth(rng, 40, 40)).save(os.path.join(directory,
                                                          "a_rgb.png"))
  Image.fromarray(_smooth(rng, 32, 32)[..., 0]).save(
      os.path.join(directory, "b_gray.png"))
  rgba = np.concatenate([_smooth(rng, 32, 32),
                         np.full((32, 32, 1), 200, np.uint8)], -1)
  Image.fromarray(rgba, "RGBA").save(os.path.join(directory, "c_rgba.png"))
  with open(os.path.join(directory, "d_broken.png"), "wb") as f:
    f.write(b"\x89PNG\r\n\x1a\n but then nothing sensible")
  Image.fromarray(_smooth(rng, 32, 48)).save(os.path.join(directory,
                                                          "e_wide.jpg"))
  with open(os.path.join(directory, "notes.txt"), "w") as f:
    f.write("not an image, ignored")
  return directory


# The small pipeline every run here uses, in-process (_config) and through
# the CLI (_cli_overrides): one list, so the two cannot drift apart.
SMALL = (("model.parser", "none"),  # no converted parser at hand
          ("batch_size", 2), ("embedding.n_mean_latent", 500),
          ("dss.coarse_steps", 3), ("dss.n_segments", 16),
          ("refine.feature_idx", 3),  # the 8² feature of the 32² generator
          ("refine.feature_steps", 4), ("refine.weight_steps", 2),
          ("edit.random_direction_seed", 0), ("edit.strengths", "-1,1"),
          ("save.intermediate", True))


def _config(bundle, inputs):
  c = _dhr_config()
  c.model.checkpoint = bundle
  c.data.input = inputs
  c.update_from_flattened_dict(dict(SMALL))
  return c


def reference_run(base):
  """The tiny bundle, the inputs and the uninterrupted in-process run that
  the other runs here are compared with (conftest's session fixture
  `tiny_run`: test_multihost compares its two processes with the same run)."""
  bundle = _make_bundle(str(base))
  inputs = make_inputs(str(base / "inputs"))
  config = _config(bundle, inputs)
  workdir = str(base / "reference")
  warnings, warning = [], run_lib.logging.warning
  run_lib.logging.warning = lambda msg, *a: warnings.append(msg % a)
  t0 = time.time()
  try:
    outcome = run_lib.run(config, workdir)
  finally:
    run_lib.logging.warning = warning
  print(f"reference run: {time.time() - t0:.1f} s")
  return dict(base=base, bundle=bundle, inputs=inputs, config=config,
              workdir=workdir, outcome=outcome, warnings=warnings)


@pytest.fixture(scope="module")
def setup(tiny_run):
  return tiny_run


def _files(workdir):
  """Relative paths of every output (the refined states' arrays.npz too:
  written with fixed time stamps, the same arrays give the same bytes)."""
  out = []
  for root, _, files in os.walk(workdir):
    for f in files:
      out.append(os.path.relpath(os.path.join(root, f), workdir))
  return sorted(out)


def _metrics_rows(workdir):
  lines = open(os.path.join(workdir, "metrics.csv")).read().splitlines()
  header = lines[0].split(",")
  return header, [dict(zip(header, l.split(","))) for l in lines[1:]]


def _assert_same_outputs(a, b):
  """Same files, same image bytes, same metrics and refined states."""
  assert _files(a) == _files(b)
  pngs = [f for f in _files(a) if f.endswith(".png")]
  assert pngs
  for f in pngs:
    with open(os.path.join(a, f), "rb") as fa, open(os.path.join(b, f),
                                                    "rb") as fb:
      assert fa.read() == fb.read(), f
  ha, ra = _metrics_rows(a)
  hb, rb = _metrics_rows(b)
  assert ha == hb
  for x, y in zip(ra, rb):
    x.pop("seconds"), y.pop("seconds")
    assert x == y
  from dhr_jax import checkpoint
  for name in GOOD:
    ta, _ = checkpoint.load(os.path.join(a, name, "refined"))
    tb, _ = checkpoint.load(os.path.join(b, name, "refined"))
    import jax
    for u, v in zip(jax.tree_util.tree_leaves(ta),
                    jax.tree_util.tree_leaves(tb)):
      np.testing.assert_array_equal(np.asarray(u), np.asarray(v))


# --------------------------------------------------------------------------


def test_end_to_end_outputs_metrics_and_failures(setup):
  outcome, workdir = setup["outcome"], setup["workdir"]
  # The corrupt file fails the run (exit 1) and is named; the rest is done.
  assert outcome.status == 1
  assert outcome.done == list(GOOD)
  assert [f["name"] for f in outcome.failed] == ["d_broken"]
  assert "d_broken.png" in outcome.message and "\n" not in outcome.message
  summary = json.load(open(os.path.join(workdir, "summary.json")))
  assert summary["images"] == 5 and summary["done"] == 4
  assert summary["failed"][0]["file"].endswith("d_broken.png")
  assert "not an image" in summary["failed"][0]["reason"]
  assert summary["config"]["refine"]["feature_steps"] == 4
  # Without the parser the run says, first thing and in summary.json, that
  # its DSS is not the paper's.
  assert setup["warnings"][0] == (
      "config.model.parser='none': DSS without a face parser uses one "
      "threshold (0.7) for every superpixel and no parsing mask; not the "
      "paper's DSS (convert the parser: python -m converters.farl --src "
      "face_parsing.farl.celebm.main_ema_181500_jit.pt --dst ckpt/farl)")
  assert summary["dss"] == ("no parser: one threshold (0.7) for every "
                            "superpixel, no parsing mask; not the paper's DSS")
  assert "parser_landmarks" not in summary
  assert {"jax", "flax", "dhr_jax"} <= set(summary["versions"])

  header, rows = _metrics_rows(workdir)
  assert header == ["name", "mse", "psnr", "lpips_alex", "lpips_vgg",
                    "in_domain", "out_of_domain", "paper_mse", "paper_psnr",
                    "paper_lpips_alex", "seconds"]
  assert [r["name"] for r in rows] == list(GOOD)
  for r in rows:
    mse, psnr = float(r["mse"]), float(r["psnr"])
    assert 0 < mse < 1
    # metrics.csv holds 6 significant digits: psnr (< 100 dB) is rounded by
    # ≤ 5e-5 dB, mse by ≤ 5e-6 relative (≤ 2.2e-5 dB of psnr); the fractions
    # (< 1) by ≤ 5e-7 each.
    assert abs(psnr - 10 * np.log10(1 / mse)) < 1e-3
    assert abs(float(r["in_domain"]) + float(r["out_of_domain"]) - 1) < 1e-5
    assert float(r["seconds"]) > 0
  assert summary["means"]["mse"] == pytest.approx(  # csv: 5e-6 rounding
      np.mean([float(r["mse"]) for r in rows]), rel=1e-5)

  edits = ["edits/random_-1.png", "edits/random_1.png"]
  for name in GOOD:
    d = os.path.join(workdir, name)
    for f in ["input.png", "inversion.png", "mask.png", "grid.png",
              "embedding.png", "coarse.png", "superpixels.png",
              "error_map.png", "done.json"] + edits:
      assert os.path.isfile(os.path.join(d, f)), (name, f)
    assert not os.path.exists(os.path.join(d, "parsing.png"))  # no parser
    assert Image.open(os.path.join(d, "inversion.png")).size == (32, 32)
    assert Image.open(os.path.join(d, "input.png")).mode == "RGB"
    grid = np.asarray(Image.open(os.path.join(d, "grid.png")))
    # input|inv|mask|2 edits, 32² tiles scaled 8× under a title strip
    strip = grid.shape[0] - 256
    assert grid.shape[1:] == (5 * 256 + 4 * 2, 3) and strip > 0
    np.testing.assert_array_equal(
        grid[strip:, :256], np.asarray(Image.open(os.path.join(
            d, "input.png"))).repeat(8, 0).repeat(8, 1))
    mask = np.asarray(Image.open(os.path.join(d, "mask.png")))
    assert set(np.unique(mask)) <= {0, 255}
    marker = json.load(open(os.path.join(d, "done.json")))
    assert sorted(marker["files"]) == sorted(
        f for f in _files(d) if f != "done.json")
  assert not os.path.exists(os.path.join(workdir, "d_broken"))
  assert not glob.glob(os.path.join(workdir, "**", ".tmp-*"), recursive=True)

  # Grayscale input: three equal channels; RGBA: composited onto white.
  gray = np.asarray(Image.open(os.path.join(workdir, "b_gray", "input.png")))
  np.testing.assert_array_equal(gray[..., 0], gray[..., 1])
  src = np.asarray(Image.open(os.path.join(setup["inputs"], "c_rgba.png")))
  want = np.floor(src[..., :3] * (200 / 255) + 255 * (55 / 255) + 0.5)
  got = np.asarray(Image.open(os.path.join(workdir, "c_rgba", "input.png")))
  # PIL composites in integer arithmetic with its own rounding: one level.
  assert np.abs(got.astype(int) - want).max() <= 1


def test_refined_state_renders_the_inversion(setup):
  """refined/ is enough to re-render: it gives back inversion.png."""
  from dhr_jax import refine
  from dhr_jax import load_generator
  G = load_generator(setup["bundle"])
  for name in GOOD:
    d = os.path.join(setup["workdir"], name)
    r = refine.load_refined(os.path.join(d, "refined"), G)
    assert r.feature_idx == 3 and r.mode == "hybrid"
    img = io.to_uint8(np.asarray(editing.render(G, r))[0])
    saved = np.asarray(Image.open(os.path.join(d, "inversion.png")))
    # Another program renders the same state: float32 forward differences
    # (~1e-6, bench/float_precision.py) can only flip a rounding to uint8.
    assert np.abs(img.astype(int) - saved).max() <= 1
    # The refinement moved the weights: not the plain generator's image.
    plain = io.to_uint8(np.asarray(G.synthesis(G.params, r.codes)))[0]
    assert np.abs(plain.astype(int) - saved).max() > 0


def test_paper_metrics_columns_from_the_written_images(setup):
  """metrics.csv's paper_* columns are `paper_metrics` of the inversion (the
  refined state re-rendered: the saved png is rounded, the paper truncates
  the float image) against input.png."""
  from dhr_jax import metrics, refine
  from dhr_jax import load_generator
  G = load_generator(setup["bundle"])
  _, rows = _metrics_rows(setup["workdir"])
  images, targets = [], []
  for name in GOOD:
    d = os.path.join(setup["workdir"], name)
    r = refine.load_refined(os.path.join(d, "refined"), G)
    images.append(np.asarray(editing.render(G, r))[0])
    targets.append(np.asarray(Image.open(os.path.join(d, "input.png"))))
  want = metrics.paper_metrics(np.stack(images), np.stack(targets))
  # Measured (x86_64 Xeon): ≤ 1.5e-6 relative, the csv's 6 significant
  # digits (≤ 5e-6). The re-render differs from the run's image by float32
  # round-off (~1e-6 a pixel, bench/float_precision.py), which can move an
  # element across a uint8 level (δ = 2/255) on another CPU; allowed: two of
  # the N = 3·32² elements. Each moves the MSE by ≤ δ·(4 + δ)/N (|error| ≤ 2
  # before the convex resize), the PSNR by 10/ln 10 of that over the MSE,
  # LPIPS-Alex by ≤ 4.7e-5 (measured: one level at 20 random elements of a
  # 32² image; bound 1e-4 each).
  d, n = 2 / 255, 3 * 32 * 32
  for i, r in enumerate(rows):
    mse = float(r["paper_mse"])
    dmse = 2 * d * (4 + d) / n
    assert abs(mse - want["mse"][i]) <= 5e-6 * mse + dmse
    assert abs(float(r["paper_psnr"]) - want["psnr"][i]) <= (
        5e-5 + 10 / np.log(10) * dmse / mse)
    assert abs(float(r["paper_lpips_alex"]) - want["lpips"][i]) <= (
        5e-7 + 2 * 1e-4)


def test_resume_after_interrupt_matches_uninterrupted(setup, tmp_path,
                                                      monkeypatch):
  """Killed while writing the second batch (half an image folder on disk),
  then restarted: same files and bytes as the uninterrupted run."""
  workdir = str(tmp_path / "resumed")

  class Killed(BaseException):
    pass

  write_bytes = files_lib.write_bytes

  def kill(path, data):
    write_bytes(path, data)
    if os.sep + "c_rgba" + os.sep in path and path.endswith("mask.png"):
      raise Killed()
  with monkeypatch.context() as m:
    m.setattr(files_lib, "write_bytes", kill)
    with pytest.raises(Killed):
      run_lib.run(setup["config"], workdir)
  assert os.path.isfile(os.path.join(workdir, "b_gray", "done.json"))
  assert os.path.isfile(os.path.join(workdir, "c_rgba", "inversion.png"))
  assert not os.path.exists(os.path.join(workdir, "c_rgba", "done.json"))
  assert not os.path.exists(os.path.join(workdir, "e_wide"))

  calls = []

  def counting_refine(*args, **kwargs):
    calls.append(args[1].shape[0])
    return _refine_batch(*args, **kwargs)
  monkeypatch.setattr(pipeline, "_refine", counting_refine)
  outcome = run_lib.run(setup["config"], workdir)
  assert outcome.skipped == 2 and outcome.status == 1
  assert calls == [2, 2]  # batches (c, pad) and (e, pad); (a, b) skipped
  _assert_same_outputs(setup["workdir"], workdir)

  # Everything complete: a third run computes nothing.
  def no_refine(*args, **kwargs):
    raise AssertionError("a complete workdir must not be recomputed")
  monkeypatch.setattr(pipeline, "_refine", no_refine)
  outcome = run_lib.run(setup["config"], workdir)
  assert outcome.skipped == 4 and outcome.done == list(GOOD)
  _assert_same_outputs(setup["workdir"], workdir)


def test_reedit_matches_editing_during_the_run(setup, tmp_path, monkeypatch):
  workdir = str(tmp_path / "copy")
  shutil.copytree(setup["workdir"], workdir)
  for name in GOOD:
    shutil.rmtree(os.path.join(workdir, name, "edits"))
    os.remove(os.path.join(workdir, name, "grid.png"))
  outcome = run_lib.edit(setup["config"], workdir)
  assert outcome.status == 0 and outcome.done == list(GOOD)
  _assert_same_outputs(setup["workdir"], workdir)

  # New directions, without refining again: an α = 0 InterFaceGAN edit
  # renders the inversion itself; the run's edits stay.
  direction = np.random.RandomState(3).randn(1, 512).astype(np.float32)
  np.save(tmp_path / "smile.npy", direction)
  config = _config(setup["bundle"], setup["inputs"])
  config.edit.random_direction_seed = -1
  config.edit.directions = f"smile={tmp_path / 'smile.npy'}"
  config.edit.strengths = "0,3"
  config.edit.layers = "0:4"
  outcome = run_lib.edit(config, workdir)
  assert outcome.status == 0
  run_edits = {}
  for name in GOOD:
    d = os.path.join(workdir, name)
    assert sorted(os.listdir(os.path.join(d, "edits"))) == [
        "random_-1.png", "random_1.png", "smile_0.png", "smile_3.png"]
    for label in ("random_-1", "random_1"):  # as the run wrote them
      with open(os.path.join(d, "edits", label + ".png"), "rb") as x, open(
          os.path.join(setup["workdir"], name, "edits", label + ".png"),
          "rb") as y:
        assert x.read() == y.read()
    run_edits[name] = np.asarray(
        Image.open(os.path.join(d, "edits", "smile_3.png")))
    zero = np.asarray(Image.open(os.path.join(d, "edits", "smile_0.png")))
    inv = np.asarray(Image.open(os.path.join(d, "inversion.png")))
    assert np.abs(zero.astype(int) - inv).max() <= 1  # uint8 rounding only
    moved = np.asarray(Image.open(os.path.join(d, "edits", "smile_3.png")))
    assert np.abs(moved.astype(int) - inv).max() > 10
    marker = json.load(open(os.path.join(d, "done.json")))
    assert marker["edits"] == ["random_-1", "random_1", "smile_0", "smile_3"]
    assert marker["edit_names"] == ["random", "smile"]
    assert sorted(f for f in marker["files"] if f.startswith("edits/")) == [
        "edits/random_-1.png", "edits/random_1.png", "edits/smile_0.png",
        "edits/smile_3.png"]
    grid = Image.open(os.path.join(d, "grid.png"))
    ref = Image.open(os.path.join(setup["workdir"], name, "grid.png"))
    # two columns more: the run's edits and this pass's
    assert grid.width > ref.width and grid.height == ref.height

  # An edit of the same name replaces the earlier file; the others stay.
  np.save(tmp_path / "smile.npy", -direction)
  config.edit.strengths = "3"
  outcome = run_lib.edit(config, workdir)
  assert outcome.status == 0
  for name in GOOD:
    d = os.path.join(workdir, name)
    assert sorted(os.listdir(os.path.join(d, "edits"))) == [
        "random_-1.png", "random_1.png", "smile_0.png", "smile_3.png"]
    again = np.asarray(Image.open(os.path.join(d, "edits", "smile_3.png")))
    assert np.abs(again.astype(int) - run_edits[name]).max() > 10
    marker = json.load(open(os.path.join(d, "done.json")))
    assert marker["edits"] == ["random_-1", "random_1", "smile_0", "smile_3"]
  # A finished workdir stays finished for `run` after re-editing.
  monkeypatch.setattr(pipeline, "_refine", lambda *a, **k: 1 / 0)
  outcome = run_lib.run(config, workdir)
  assert outcome.skipped == 4


def test_nan_marks_only_that_image_failed(setup, tmp_path, monkeypatch):
  import dataclasses
  batches = []

  def poisoned(*args, **kwargs):
    result = _refine_batch(*args, **kwargs)
    batches.append(1)
    if len(batches) == 1:  # b_gray: second image of the first batch
      losses = np.asarray(result.losses_out).copy()
      losses[1, -1] = np.nan
      result = dataclasses.replace(result, losses_out=losses)
    return result
  workdir = str(tmp_path / "nan")
  monkeypatch.setattr(pipeline, "_refine", poisoned)
  outcome = run_lib.run(setup["config"], workdir)
  assert outcome.status == 1
  assert outcome.done == ["a_rgb", "c_rgba", "e_wide"]
  reasons = {f["name"]: f["reason"] for f in outcome.failed}
  assert set(reasons) == {"b_gray", "d_broken"}
  assert "NaN" in reasons["b_gray"]
  assert not os.path.exists(os.path.join(workdir, "b_gray", "done.json"))
  _, rows = _metrics_rows(workdir)
  assert [r["name"] for r in rows] == ["a_rgb", "c_rgba", "e_wide"]
  # The images that succeeded are the same as in the reference run.
  for name in ("a_rgb", "c_rgba", "e_wide"):
    for f in ("inversion.png", "grid.png"):
      with open(os.path.join(workdir, name, f), "rb") as x, open(
          os.path.join(setup["workdir"], name, f), "rb") as y:
        assert x.read() == y.read()


def test_user_errors_are_refused_early(setup, tmp_path, monkeypatch):
  config = _config(setup["bundle"], setup["inputs"])
  # Unwritable workdir: refused before any model is loaded.
  monkeypatch.setattr(loading, "load_models", lambda *a: 1 / 0)
  blocker = tmp_path / "file"
  blocker.write_text("")
  with pytest.raises(run_lib.UserError, match="not writable"):
    run_lib.run(config, str(blocker / "out"))
  monkeypatch.undo()
  # Missing checkpoint: the error names the converter command.
  config.model.checkpoint = str(tmp_path / "nowhere")
  with pytest.raises(run_lib.UserError,
                     match=r"python -m converters\.e4e .*--dst .*nowhere"):
    run_lib.run(config, str(tmp_path / "out"))
  config = _config(setup["bundle"], setup["inputs"])
  config.model.parser = str(tmp_path / "farl")
  with pytest.raises(run_lib.UserError, match=r"python -m converters\.farl"):
    run_lib.run(config, str(tmp_path / "out"))
  config = _config(setup["bundle"], str(tmp_path / "no_inputs"))
  with pytest.raises(run_lib.UserError, match="no such file or folder"):
    run_lib.run(config, str(tmp_path / "out"))
  config = _config(setup["bundle"], setup["inputs"])
  config.edit.directions = "smile=" + str(tmp_path / "missing.npy")
  with pytest.raises(run_lib.UserError, match=r"missing\.npy"):
    run_lib.run(config, str(tmp_path / "out"))
  # Refused runs create nothing: no workdir to re-edit.
  assert not (tmp_path / "out").exists()
  with pytest.raises(run_lib.UserError, match="does not exist"):
    run_lib.edit(_config(setup["bundle"], setup["inputs"]),
                 str(tmp_path / "out"))
  (tmp_path / "out").mkdir()
  with pytest.raises(run_lib.UserError, match="no finished images"):
    run_lib.edit(_config(setup["bundle"], setup["inputs"]),
                 str(tmp_path / "out"))


def test_cli_exit_status_and_one_line_errors(setup, tmp_path):
  cmd = [sys.executable, os.path.join(REPO, "run.py"),
         "--config=" + os.path.join(REPO, "configs", "dhr.py"),
         "--config.data.input=" + setup["inputs"],
         "--config.model.checkpoint=" + str(tmp_path / "missing_bundle"),
         "--workdir=" + str(tmp_path / "out")]
  p = subprocess.run(cmd, capture_output=True, text=True, cwd=str(tmp_path),
                     timeout=300)
  assert p.returncode == 2
  assert "Traceback" not in p.stderr
  errors = [l for l in p.stderr.splitlines() if l.startswith("error:")]
  assert len(errors) == 1 and "python -m converters.e4e" in errors[0]


def test_default_config_without_the_parser_exits_2(tmp_path):
  # configs/dhr.py as it is, with an e4e bundle but no converted parser
  # (ckpt/farl under the working directory): one line naming both ways on,
  # and nothing created.
  p = subprocess.run(
      [sys.executable, os.path.join(REPO, "run.py"),
       "--config=" + os.path.join(REPO, "configs", "dhr.py"),
       "--config.data.input=" + os.path.join(make_inputs(
           str(tmp_path / "inputs")), "a_rgb.png"),
       "--config.model.checkpoint=" + _make_bundle(str(tmp_path)),
       "--workdir=" + str(tmp_path / "out")],
      capture_output=True, text=True, cwd=str(tmp_path), timeout=300,
      env=dict(os.environ, JAX_PLATFORMS="cpu"))
  assert p.returncode == 2, p.stderr[-3000:]
  assert "Traceback" not in p.stderr
  assert [l for l in p.stderr.splitlines() if l.startswith("error:")] == [
      "error: parser checkpoint 'ckpt/farl' not found. Convert the released "
      "PyTorch file first: python -m converters.farl --src "
      "face_parsing.farl.celebm.main_ema_181500_jit.pt --dst ckpt/farl "
      "(facer's FaRL celebm/448 parser, github.com/FacePerceiver/facer "
      "release models-v1); or run without a parser, not the paper's DSS: "
      "--config.model.parser=none"]
  assert not (tmp_path / "out").exists()


# --------------------------------------------------------------------------
# Two devices: the CLI in a subprocess (the device count is fixed when JAX
# starts) against the single-device reference run of this module.


def _cli_overrides(setup):
  return ([
      "--config=" + os.path.join(REPO, "configs", "dhr.py"),
      "--config.model.checkpoint=" + setup["bundle"],
      "--config.data.input=" + setup["inputs"]]
      + [f"--config.{key}={value}" for key, value in SMALL])


@pytest.mark.slow  # a second process compiling the whole pipeline (~2 min)
def test_two_device_sharded_run_equals_single_device(setup, tmp_path):
  workdir = str(tmp_path / "two")
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2",
             JAX_PLATFORMS="cpu")
  p = subprocess.run(
      [sys.executable, os.path.join(REPO, "run.py"), "--workdir=" + workdir]
      + _cli_overrides(setup), capture_output=True, text=True, env=env,
      cwd=str(tmp_path), timeout=900)
  # One corrupt input: exit 1 with a one-line summary, no traceback.
  assert p.returncode == 1, p.stderr[-3000:]
  assert "Traceback" not in p.stderr
  last = p.stderr.strip().splitlines()[-1]
  assert last.startswith("DHR: 4 of 5 images done, 1 failed: ") and (
      "d_broken.png" in last)
  summary = json.load(open(os.path.join(workdir, "summary.json")))
  assert len(summary["devices"]) == 2

  ref = setup["workdir"]
  assert _files(ref) == _files(workdir)
  import jax
  from dhr_jax import refine
  from dhr_jax import load_generator
  G = load_generator(setup["bundle"])
  worst = {"state": 0.0, "image": 0.0, "state_max": 0.0}
  flat = lambda r: np.concatenate([np.ravel(np.asarray(x, np.float64)) for x in
                                   jax.tree_util.tree_leaves(
                                       (r.params, r.offset, r.codes))])
  for name in GOOD:
    ra = refine.load_refined(os.path.join(ref, name, "refined"), G)
    rb = refine.load_refined(os.path.join(workdir, name, "refined"), G)
    np.testing.assert_array_equal(ra.mask_feature, rb.mask_feature)
    worst["state"] = max(worst["state"], rel_l2(flat(rb), flat(ra)))
    worst["state_max"] = max(worst["state_max"],
                             float(np.abs(flat(rb) - flat(ra)).max()))
    worst["image"] = max(worst["image"], rel_l2(editing.render(G, rb),
                                                editing.render(G, ra)))
    for f in ("mask.png", "inversion.png", "edits/random_1.png"):
      a = np.asarray(Image.open(os.path.join(ref, name, f)), int)
      b = np.asarray(Image.open(os.path.join(workdir, name, f)), int)
      # mask.png is a decision: a superpixel flips only if its score is
      # within float32's error (~1e-6) of the threshold. Each program's
      # images are ≤ 9.4e-6 (max |Δ|) from float64 (measured, below), far
      # under one uint8 level (7.8e-3): only a value at a rounding boundary
      # can move by one.
      assert np.abs(a - b).max() <= (0 if f == "mask.png" else 1), (name, f)
  # Each device refines 1 image instead of 2 (refine.map_images): a
  # different float32 program. Measured (bench/float_precision.py --part
  # refine: this test's inputs, DSS masks and settings, worst of the four
  # images), each program against a float64 run: the state as counted here
  # (the unchanged mapping weights and codes included) 1.4e-9 and 1.0e-9,
  # the image 4.7e-6 and 4.8e-6, the metrics 9.7e-7 and 9.7e-7 (|Δ| /
  # max(1, |m|)); the two float32 programs were 2.4e-9, 1.6e-6 and 3.0e-7
  # apart. Rounding part of each bound: 4 × the sum of both programs'
  # errors (as in test_refine): state 1e-8, image 3.8e-5, metrics 7.8e-6.
  # On top of it Adam flips: a weight whose gradient is below float32's
  # resolution steps by ±weight_lr at each weight step, whichever sign its
  # rounding gives, so it can end 2 · 1.5e-3 · 2 = 6e-3 apart: 8e-8 of this
  # state's norm (7e4, mostly the mapping weights). AMD EPYC (issue #12)
  # showed state 4.85e-8 with image 3.48e-5, i.e. about one such weight
  # costing ~2.5e-5 of image. Allowing four: state 1e-8 + 4 × 8e-8 → 4e-7,
  # image 3.8e-5 + 4 × 2.5e-5 → 1.5e-4, metrics (a fifth of the image's
  # relative change in the measurement) → 5e-5.
  print("two devices vs one: relative L2 of the refined state "
        f"{worst['state']:.2e} (largest element {worst['state_max']:.2e}), "
        f"of the re-rendered inversions {worst['image']:.2e}")
  assert worst["state"] <= 4e-7 and worst["image"] <= 1.5e-4
  _, ra = _metrics_rows(ref)
  _, rb = _metrics_rows(workdir)
  for x, y in zip(ra, rb):
    for k in x:
      if k not in ("name", "seconds"):
        assert abs(float(x[k]) - float(y[k])) <= 5e-5 * max(
            1.0, abs(float(x[k]))), (x["name"], k)


@pytest.mark.slow  # a CLI process compiling the pipeline (~1.5 min)
def test_kill_9_after_first_batch_then_restart(setup, tmp_path, capsys):
  """A real SIGKILL once the first batch is written, then a restart: the
  same files and image bytes as the uninterrupted run. The restart is
  `runner.main` (what run.py calls with the parsed flags) in this process,
  on the config the CLI flags spell (_cli_overrides is made from the same
  SMALL list): it reads what the killed process left (its lock, finished
  and half-written folders) as a new process would, and uses the programs
  the reference run compiled here instead of compiling them again."""
  workdir = str(tmp_path / "killed")
  cmd = [sys.executable, os.path.join(REPO, "run.py"),
         "--workdir=" + workdir] + _cli_overrides(setup)
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  env.pop("XLA_FLAGS", None)
  proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL,
                          stderr=subprocess.DEVNULL, env=env,
                          cwd=str(tmp_path))
  first = [os.path.join(workdir, n, "done.json") for n in GOOD[:2]]
  deadline = time.time() + 600
  try:
    while not all(os.path.exists(f) for f in first):
      assert proc.poll() is None, "the run ended before it could be killed"
      assert time.time() < deadline
      time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
  finally:
    proc.wait()
  assert proc.returncode == -signal.SIGKILL
  assert not os.path.exists(os.path.join(workdir, "e_wide", "done.json"))
  capsys.readouterr()
  assert run_lib.main(setup["config"], workdir, "run") == 1
  last = capsys.readouterr().err.strip().splitlines()[-1]
  assert last.startswith("DHR: 4 of 5 images done, 1 failed: "), last
  summary = json.load(open(os.path.join(workdir, "summary.json")))
  assert summary["skipped_complete"] >= 2
  _assert_same_outputs(setup["workdir"], workdir)


@pytest.mark.slow  # the demo itself, a few minutes
def test_demo_command(tmp_path):
  # Its time is not asserted (it depends on the machine): the 15 slowest
  # tests, this one among them, are printed by .ci/run (--durations=15).
  workdir = str(tmp_path / "demo")
  t0 = time.time()
  p = subprocess.run([sys.executable, os.path.join(REPO, "run.py"),
                      "--config=" + os.path.join(REPO, "configs", "demo.py"),
                      "--workdir=" + workdir], capture_output=True, text=True,
                     cwd=str(tmp_path), timeout=900)
  seconds = time.time() - t0
  print(p.stdout[-3000:])
  print(f"demo: {seconds:.0f} s")
  assert p.returncode == 0, p.stderr[-3000:]
  _, rows = _metrics_rows(workdir)
  assert len(rows) == 1
  r = {k: float(v) for k, v in rows[0].items() if k != "name"}
  # DSS finds the pasted photograph and keeps most of the rest in-domain;
  # refinement improves both regions well beyond the embedding.
  assert r["gt_recall"] >= 0.9 and r["gt_rest_in"] >= 0.8
  assert r["psnr_in"] >= r["psnr_in_embed"] + 5
  assert r["psnr_out"] >= r["psnr_out_embed"] + 5
  d = os.path.join(workdir, "synthetic_0")
  grid = np.asarray(Image.open(os.path.join(d, "grid.png")))
  assert grid.shape[1:] == (5 * 256 + 4 * 2, 3)  # 64² tiles scaled 4×
  for f in ("edits/random_-2.png", "edits/random_2.png", "superpixels.png",
            "coarse.png", "error_map.png", "embedding.png"):
    assert os.path.isfile(os.path.join(d, f))
  assert "gt_recall" in p.stdout and "psnr_out_embed" in p.stdout


# --------------------------------------------------------------------------
# Small pieces (no pipeline run).


def test_image_keys_follow_names_not_positions():
  a = pipeline.image_keys(0, ["x", "y", "z"], "coarse")
  b = pipeline.image_keys(0, ["z", "x"], "coarse")
  np.testing.assert_array_equal(a[0], b[1])
  np.testing.assert_array_equal(a[2], b[0])
  assert len({tuple(k) for k in a}) == 3
  assert not np.array_equal(a[0], pipeline.image_keys(1, ["x"], "coarse")[0])
  assert not np.array_equal(a[0], pipeline.image_keys(0, ["x"], "emb")[0])
  assert pipeline.padded_size(1, 3, 2) == 4
  assert pipeline.padded_size(2, 4, 1) == 4


def test_optim_embedding_starts_from_latent_avg_or_the_coarse_codes(
    monkeypatch):
  """'optim' starts from the generator's latent_avg (the official
  embedding), or with init='coarse' from DSS's coarse codes (W+ or W), with
  per-name keys; steps = 0 takes the start as it is."""
  import jax.numpy as jnp
  import ml_collections
  from dhr_jax import embedding, pipeline
  from dhr_jax.models.stylegan2 import init_generator
  G = init_generator(np.asarray([0, 1], np.uint32), size=8, style_dim=8,
                     n_mlp=1, channels=8)
  models = loading.Models(G=G, lpips_vgg="vgg", lpips_alex=None,
                           w_stats=("mean", "spread"))
  coarse = jnp.asarray(np.random.RandomState(0).randn(2, G.n_latent, 8),
                       jnp.float32)
  calls = []

  def fake(G_, target, lpips_vgg, **kw):
    calls.append(kw)
    codes = kw["init"] if kw["space"] == "w+" else jnp.repeat(
        kw["init"][:, None], G.n_latent, 1)
    return embedding.EmbeddingResult(codes=codes + 1, image=None, noise=[],
                                     losses=None, terms={})
  monkeypatch.setattr(embedding, "optimize_latent", fake)
  x = jnp.zeros((2, 8, 8, 3))
  c = ml_collections.ConfigDict(dict(method="optim", init="coarse", steps=0,
                                     space="w+", lr=0.1, mse_lambda=0.0))
  codes, image = pipeline.embed(models, c, x, ["p", "q"], 0, coarse)
  assert not calls
  np.testing.assert_array_equal(codes, coarse)
  np.testing.assert_allclose(  # one forward pass, other program: ~1e-6
      image, G.synthesis(G.params, coarse), atol=1e-5)
  c.steps = 7
  codes, _ = pipeline.embed(models, c, x, ["p", "q"], 0, coarse)
  np.testing.assert_array_equal(codes, coarse + 1)
  kw = calls[-1]
  assert kw["steps"] == 7 and kw["w_stats"] == ("mean", "spread")
  np.testing.assert_array_equal(kw["init"], coarse)
  np.testing.assert_array_equal(kw["key"],
                                pipeline.image_keys(0, ["p", "q"],
                                                    "embedding"))
  c.space = "w"
  pipeline.embed(models, c, x, ["p", "q"], 0, coarse)
  np.testing.assert_array_equal(calls[-1]["init"], coarse[:, 0])
  # The official start: latent_avg, whatever the coarse codes are.
  c.init = "latent_avg"
  pipeline.embed(models, c, x, ["p", "q"], 0, coarse)
  np.testing.assert_array_equal(calls[-1]["init"],
                                np.broadcast_to(G.latent_avg, (2, 8)))
  c.steps, c.space = 0, "w+"
  codes, _ = pipeline.embed(models, c, x, ["p", "q"], 0, None)
  np.testing.assert_array_equal(
      codes, np.broadcast_to(G.latent_avg, (2, G.n_latent, 8)))
  c.init = "mean"
  with pytest.raises(pipeline.PipelineError, match="embedding.init"):
    pipeline.embed(models, c, x, ["p", "q"], 0, coarse)
  c.init = "coarse"
  with pytest.raises(pipeline.PipelineError, match="coarse"):
    pipeline.embed(models, c, x, ["p", "q"], 0, None)
  c.method = "psp"  # an encoder's method without its encoder
  with pytest.raises(pipeline.PipelineError, match="needs its encoder"):
    pipeline.embed(models, c, x, ["p", "q"], 0, coarse)
  c.method = "sam"  # no such embedding: the choices are named
  with pytest.raises(pipeline.PipelineError, match="e4e"):
    pipeline.embed(models, c, x, ["p", "q"], 0, coarse)


def test_coarse_inversion_target_is_the_official_256_resize(monkeypatch):
  """run_batch gives DSS's coarse inversion the input as the official data
  set transform does (PIL bilinear to 256²), not the generator-size image."""
  from dhr_jax import embedding, pipeline
  from dhr_jax.models.stylegan2 import init_generator
  G = init_generator(np.asarray([0, 3], np.uint32), size=8, style_dim=8,
                     n_mlp=1, channels=8)
  models = loading.Models(G=G, lpips_vgg="vgg", lpips_alex=None,
                           w_stats=("mean", "spread"))

  class Seen(Exception):
    pass

  def fake(G_, target, lpips_vgg, **kw):
    raise Seen(np.asarray(target))
  monkeypatch.setattr(embedding, "coarse_inversion", fake)
  u = np.random.RandomState(0).randint(0, 256, (2, 8, 8, 3), np.uint8)
  config = _dhr_config()
  config.batch_size = 2
  with pytest.raises(Seen) as seen:
    methods.run_batch(models, config, u / 127.5 - 1.0, ["p", "q"])
  target = seen.value.args[0]
  assert target.shape == (2, 256, 256, 3)
  for i in range(2):
    want = Image.fromarray(u[i]).resize((256, 256), Image.BILINEAR)
    np.testing.assert_array_equal(io.to_uint8(target[i]), np.asarray(want))


def test_build_edits_from_config(tmp_path):
  import torch
  from dhr_jax.models.stylegan2 import init_generator
  G = init_generator(np.asarray([0, 2], np.uint32), size=8, style_dim=8,
                     n_mlp=1, channels=8)
  n = np.random.RandomState(0).randn(8).astype(np.float32)
  np.save(tmp_path / "age.npy", n)
  torch.save(torch.from_numpy(n[None]), tmp_path / "pose.pt")
  pcs = np.linalg.qr(np.random.RandomState(1).randn(8, 8))[0].T
  np.savez(tmp_path / "pca.npz", components=pcs, std=np.arange(1, 9.0),
           mean=np.zeros(8))
  c = _dhr_config().edit
  c.directions = f"age={tmp_path / 'age.npy'}, pose={tmp_path / 'pose.pt'}"
  c.strengths = "-1,2.5"
  c.layers = "0:2"
  c.ganspace = str(tmp_path / "pca.npz")
  c.ganspace_edits = "3,1,3,2; 0,0,1,-1+1,0,1,1"
  c.random_direction_seed = 5
  specs = edits_lib.from_config(c, G)
  labels = [l for s in specs for l in s.labels]
  assert labels == ["age_-1", "age_2.5", "pose_-1", "pose_2.5",
                    "pca_3_1-3_2", "pca_0_0-1_-1+1_0-1_1", "random_-1",
                    "random_2.5"]
  codes = np.random.RandomState(2).randn(1, G.n_latent, 8).astype(np.float32)
  age, pose = (np.asarray(s.fn(codes)) for s in specs[:2])
  np.testing.assert_array_equal(age, pose)  # .npy and .pt: same direction
  # codes + α·n, one float32 rounding of values ≲ 10: ≤ 5e-7 each.
  np.testing.assert_allclose(age[0, 1, :2] - codes[0, :2], 2.5 * n[None] *
                             np.ones((2, 1)), rtol=1e-6, atol=1e-6)
  np.testing.assert_array_equal(age[0, :, 2:], codes[:, None, 2:][0].repeat(
      2, 0))
  gs = np.asarray(specs[2].fn(codes))
  # Two components' moves summed and subtracted again in float32 on values
  # ≲ 10: a few roundings of ≤ 5e-7.
  np.testing.assert_allclose(gs[0, 0, 1:3] - codes[0, 1:3],
                             np.tile(2 * 4.0 * pcs[3], (2, 1)), atol=1e-5)
  rnd = np.asarray(specs[3].fn(codes))
  step = (rnd[0, 1] - codes[0])[0] / 2.5
  # A seeded unit direction, recovered by (codes + 2.5 n − codes) / 2.5:
  # roundings near |codes| ≲ 3 leave ≤ 2e-7 per element, ≤ 6e-7 on the
  # norm of these 8 elements.
  assert abs(np.linalg.norm(step) - 1) < 1e-5
  c.directions = "age"
  with pytest.raises(run_lib.UserError, match="name=path"):
    edits_lib.from_config(c, G)
  c.directions = f"a={tmp_path / 'age.npy'},a={tmp_path / 'age.npy'}"
  c.ganspace, c.ganspace_edits, c.random_direction_seed = "", "", -1
  with pytest.raises(run_lib.UserError, match="same name"):
    edits_lib.from_config(c, G)
  c.directions, c.ganspace_edits = "", "1,0,1,1"
  with pytest.raises(run_lib.UserError, match="ganspace"):
    edits_lib.from_config(c, G)
  np.save(tmp_path / "wide.npy", np.ones(16, np.float32))
  c.ganspace_edits, c.directions = "", f"w={tmp_path / 'wide.npy'}"
  with pytest.raises(run_lib.UserError, match="does not fit"):
    edits_lib.from_config(c, G)
