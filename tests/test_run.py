"""run.py end to end on CPU with a tiny e4e bundle made by the real converters.

The generator is a 32² StyleGAN2 with seeded random weights; the encoder has
the released e4e layout with zero weights (so it predicts latent_avg for
every image), both converted from a torch.save'd bundle by converters.e4e.
Steps are cut to a handful so that the whole module runs in a few minutes;
the runs share compiled functions through run.py's model cache.
"""
import glob
import importlib.util
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

import run as run_lib  # noqa: E402  (run.py lives at the repo root)
from conftest import rel_l2  # noqa: E402
from dhr_jax import io  # noqa: E402

GOOD = ("a_rgb", "b_gray", "c_rgba", "e_wide")


def _dhr_config():
  spec = importlib.util.spec_from_file_location(
      "dhr_config", os.path.join(REPO, "configs", "dhr.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


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


def _make_inputs(directory):
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


def _config(bundle, inputs):
  c = _dhr_config()
  c.model.checkpoint = bundle
  c.data.input = inputs
  c.batch_size = 2
  c.embedding.n_mean_latent = 500
  c.dss.coarse_steps = 3
  c.dss.n_segments = 16
  c.refine.feature_idx = 3       # the 8² feature of the 32² generator
  c.refine.feature_steps = 4
  c.refine.weight_steps = 2
  c.edit.random_direction_seed = 0
  c.edit.strengths = "-1,1"
  c.save.intermediate = True
  return c


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
  base = tmp_path_factory.mktemp("run")
  bundle = _make_bundle(str(base))
  inputs = _make_inputs(str(base / "inputs"))
  config = _config(bundle, inputs)
  workdir = str(base / "reference")
  t0 = time.time()
  outcome = run_lib.run(config, workdir)
  print(f"reference run: {time.time() - t0:.1f} s")
  return dict(base=base, bundle=bundle, inputs=inputs, config=config,
              workdir=workdir, outcome=outcome)


def _files(workdir):
  """Relative paths of every output, orbax internals of refined/ excluded."""
  out = []
  for root, _, files in os.walk(workdir):
    for f in files:
      rel = os.path.relpath(os.path.join(root, f), workdir)
      if "/refined/arrays" not in "/" + rel:
        out.append(rel)
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
  assert {"jax", "flax", "dhr_jax"} <= set(summary["versions"])

  header, rows = _metrics_rows(workdir)
  assert header == ["name", "mse", "psnr", "lpips_alex", "lpips_vgg",
                    "in_domain", "out_of_domain", "seconds"]
  assert [r["name"] for r in rows] == list(GOOD)
  for r in rows:
    mse, psnr = float(r["mse"]), float(r["psnr"])
    assert 0 < mse < 1
    assert abs(psnr - 10 * np.log10(1 / mse)) < 1e-3
    assert abs(float(r["in_domain"]) + float(r["out_of_domain"]) - 1) < 1e-5
    assert float(r["seconds"]) > 0
  assert summary["means"]["mse"] == pytest.approx(
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
    assert grid.shape == (32, 5 * 32 + 4 * 2, 3)  # input|inv|mask|2 edits
    np.testing.assert_array_equal(
        grid[:, :32], np.asarray(Image.open(os.path.join(d, "input.png"))))
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
  assert np.abs(got.astype(int) - want).max() <= 1


def test_refined_state_renders_the_inversion(setup):
  """refined/ is enough to re-render: it gives back inversion.png."""
  from dhr_jax import refine
  from dhr_jax.models.stylegan2 import load_generator
  G = load_generator(setup["bundle"])
  for name in GOOD:
    d = os.path.join(setup["workdir"], name)
    r = refine.load_refined(os.path.join(d, "refined"), G)
    assert r.feature_idx == 3 and r.mode == "hybrid"
    img = io.to_uint8(np.asarray(r.synthesize(G))[0])
    saved = np.asarray(Image.open(os.path.join(d, "inversion.png")))
    assert np.abs(img.astype(int) - saved).max() <= 1
    # The refinement moved the weights: not the plain generator's image.
    plain = io.to_uint8(np.asarray(G.synthesis(G.params, r.codes)))[0]
    assert np.abs(plain.astype(int) - saved).max() > 0


def test_resume_after_interrupt_matches_uninterrupted(setup, tmp_path):
  """Killed while writing the second batch (half an image folder on disk),
  then restarted: same files and bytes as the uninterrupted run."""
  workdir = str(tmp_path / "resumed")

  class Killed(BaseException):
    pass

  def kill(path):
    if os.sep + "c_rgba" + os.sep in path and path.endswith("mask.png"):
      raise Killed()
  run_lib.on_file_written = kill
  try:
    with pytest.raises(Killed):
      run_lib.run(setup["config"], workdir)
  finally:
    run_lib.on_file_written = None
  assert os.path.isfile(os.path.join(workdir, "b_gray", "done.json"))
  assert os.path.isfile(os.path.join(workdir, "c_rgba", "inversion.png"))
  assert not os.path.exists(os.path.join(workdir, "c_rgba", "done.json"))
  assert not os.path.exists(os.path.join(workdir, "e_wide"))

  calls = []

  def counting_refine(*args, **kwargs):
    from dhr_jax import refine
    calls.append(args[1].shape[0])
    return refine.hybrid_refine(*args, **kwargs)
  outcome = run_lib.run(setup["config"], workdir, refine_fn=counting_refine)
  assert outcome.skipped == 2 and outcome.status == 1
  assert calls == [2, 2]  # batches (c, pad) and (e, pad); (a, b) skipped
  _assert_same_outputs(setup["workdir"], workdir)

  # Everything complete: a third run computes nothing.
  def no_refine(*args, **kwargs):
    raise AssertionError("a complete workdir must not be recomputed")
  outcome = run_lib.run(setup["config"], workdir, refine_fn=no_refine)
  assert outcome.skipped == 4 and outcome.done == list(GOOD)
  _assert_same_outputs(setup["workdir"], workdir)


def test_reedit_matches_editing_during_the_run(setup, tmp_path):
  workdir = str(tmp_path / "copy")
  shutil.copytree(setup["workdir"], workdir)
  for name in GOOD:
    shutil.rmtree(os.path.join(workdir, name, "edits"))
    os.remove(os.path.join(workdir, name, "grid.png"))
  outcome = run_lib.edit(setup["config"], workdir)
  assert outcome.status == 0 and outcome.done == list(GOOD)
  _assert_same_outputs(setup["workdir"], workdir)

  # New directions, without refining again: an α = 0 InterFaceGAN edit
  # renders the inversion itself; the old edits are replaced.
  from dhr_jax.models.stylegan2 import load_generator
  G = load_generator(setup["bundle"])
  direction = np.random.RandomState(3).randn(1, 512).astype(np.float32)
  np.save(tmp_path / "smile.npy", direction)
  config = _config(setup["bundle"], setup["inputs"])
  config.edit.random_direction_seed = -1
  config.edit.directions = f"smile={tmp_path / 'smile.npy'}"
  config.edit.strengths = "0,3"
  config.edit.layers = "0:4"
  outcome = run_lib.edit(config, workdir)
  assert outcome.status == 0
  for name in GOOD:
    d = os.path.join(workdir, name)
    assert sorted(os.listdir(os.path.join(d, "edits"))) == [
        "smile_0.png", "smile_3.png"]
    zero = np.asarray(Image.open(os.path.join(d, "edits", "smile_0.png")))
    inv = np.asarray(Image.open(os.path.join(d, "inversion.png")))
    assert np.abs(zero.astype(int) - inv).max() <= 1
    moved = np.asarray(Image.open(os.path.join(d, "edits", "smile_3.png")))
    assert np.abs(moved.astype(int) - inv).max() > 10
    marker = json.load(open(os.path.join(d, "done.json")))
    assert marker["edits"] == ["smile_0", "smile_3"]
  # A finished workdir stays finished for `run` after re-editing.
  outcome = run_lib.run(config, workdir, refine_fn=lambda *a, **k: 1 / 0)
  assert outcome.skipped == 4


def test_nan_marks_only_that_image_failed(setup, tmp_path):
  import dataclasses
  from dhr_jax import refine
  batches = []

  def poisoned(*args, **kwargs):
    result = refine.hybrid_refine(*args, **kwargs)
    batches.append(1)
    if len(batches) == 1:  # b_gray: second image of the first batch
      losses = np.asarray(result.losses_out).copy()
      losses[1, -1] = np.nan
      result = dataclasses.replace(result, losses_out=losses)
    return result
  workdir = str(tmp_path / "nan")
  outcome = run_lib.run(setup["config"], workdir, refine_fn=poisoned)
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
  monkeypatch.setattr(run_lib, "load_models", lambda *a: 1 / 0)
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


# --------------------------------------------------------------------------
# Two devices: the CLI in a subprocess (the device count is fixed when JAX
# starts) against the single-device reference run of this module.


def _cli_overrides(setup):
  return [
      "--config=" + os.path.join(REPO, "configs", "dhr.py"),
      "--config.model.checkpoint=" + setup["bundle"],
      "--config.data.input=" + setup["inputs"],
      "--config.batch_size=2", "--config.embedding.n_mean_latent=500",
      "--config.dss.coarse_steps=3", "--config.dss.n_segments=16",
      "--config.refine.feature_idx=3", "--config.refine.feature_steps=4",
      "--config.refine.weight_steps=2",
      "--config.edit.random_direction_seed=0", "--config.edit.strengths=-1,1",
      "--config.save.intermediate=True"]


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
  from dhr_jax.models.stylegan2 import load_generator
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
    worst["image"] = max(worst["image"], rel_l2(rb.synthesize(G),
                                                ra.synthesize(G)))
    for f in ("mask.png", "inversion.png", "edits/random_1.png"):
      a = np.asarray(Image.open(os.path.join(ref, name, f)), int)
      b = np.asarray(Image.open(os.path.join(workdir, name, f)), int)
      assert np.abs(a - b).max() <= (0 if f == "mask.png" else 1), (name, f)
  # Each device runs the vmapped refinement on 1 image instead of 2, a
  # different program whose roundings differ; Adam's normalised steps turn
  # some of these into differences of up to ~lr on single weights whose
  # gradient is nearly zero, so the state is compared as a whole.
  print("two devices vs one: relative L2 of the refined state "
        f"{worst['state']:.2e} (largest element {worst['state_max']:.2e}), "
        f"of the re-rendered inversions {worst['image']:.2e}")
  assert worst["state"] <= 1e-5 and worst["image"] <= 1e-5
  _, ra = _metrics_rows(ref)
  _, rb = _metrics_rows(workdir)
  for x, y in zip(ra, rb):
    for k in x:
      if k not in ("name", "seconds"):
        assert abs(float(x[k]) - float(y[k])) <= 1e-5 * max(
            1.0, abs(float(x[k]))), (x["name"], k)
