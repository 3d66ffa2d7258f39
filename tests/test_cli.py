"""What a new user meets: refusals of bad settings, the workdir lock,
progress, the pictures and index.html, the edit pass's outcome.

Pipeline runs use the demo config cut to a 32² stand-in generator and a few
steps; subprocess runs of run.py only where the exit status and stderr are
the point.
"""
import json
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from dhr_jax import cli
from dhr_jax import io
from dhr_jax import loading
from dhr_jax import lock as lock_lib
from dhr_jax import loop as loop_lib
from dhr_jax import pictures
from dhr_jax import runner as run_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO = os.path.join(REPO, "configs", "demo.py")
# The demo pipeline at 32² with a handful of steps, two synthetic images.
_TINY = (("batch_size", 2), ("data.synthetic.count", 2),
         ("model.stand_in.size", 32), ("model.stand_in.style_dim", 32),
         ("model.stand_in.n_mlp", 1), ("model.stand_in.channels", 16),
         ("embedding.n_mean_latent", 100), ("dss.coarse_steps", 2),
         ("dss.n_segments", 8), ("refine.feature_idx", 3),
         ("refine.feature_steps", 3), ("refine.weight_steps", 2))


def _demo_config():
  return cli.load_config_file(DEMO)


def _tiny_config():
  c = _demo_config()
  c.update_from_flattened_dict(dict(_TINY))
  return c


def _cli(args, cwd, timeout=300):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  return subprocess.run([sys.executable, os.path.join(REPO, "run.py")] + args,
                        capture_output=True, text=True, cwd=str(cwd),
                        env=env, timeout=timeout)


def _one_error_line(p):
  """The refusal: exit 2, stderr one `error:` line and no traceback."""
  assert p.returncode == 2, p.stderr[-2000:]
  lines = [l for l in p.stderr.splitlines() if l.strip()]
  assert len(lines) == 1 and lines[0].startswith("error: "), p.stderr[-2000:]
  return lines[0]


# --------------------------------------------------------------------------
# Settings are refused in one line, before anything is created.


def test_config_flag_errors_are_one_line_exit_2(tmp_path):
  workdir = tmp_path / "out"
  base = ["--config=" + DEMO, "--workdir=" + str(workdir)]
  line = _one_error_line(_cli(base + ["--config.refine.nope=1"], tmp_path))
  assert "--config.refine.nope" in line and "feature_steps" in line
  line = _one_error_line(_cli(["--config=configs/nope.py",
                               "--workdir=" + str(workdir)], tmp_path))
  assert "configs/nope.py" in line and "configs/dhr.py" in line
  line = _one_error_line(_cli(base + ["--config.refine.feature_steps=abc"],
                              tmp_path))
  assert "refine.feature_steps=abc" in line and "integer" in line
  line = _one_error_line(_cli(base + ["--config.refine.mode=bogus"],
                              tmp_path))
  assert "refine.mode" in line and "hybrid, weight, feature" in line
  line = _one_error_line(_cli(base + ["--precision=float16"], tmp_path))
  assert "--precision=float16" in line and "float32" in line
  assert not workdir.exists()


def test_explain_flag_error_names_key_and_allowed_values():
  argv = ["run.py", "--config=" + DEMO]
  err = AttributeError("'nope'")
  assert cli.explain_flag_error(argv + ["--config.nope.x=1"], err) == (
      "--config.nope.x: no such setting; config has batch_size, data, dss, "
      "edit, embedding, model, refine, save, seed")
  line = cli.explain_flag_error(
      argv + ["--config.save.intermediate=maybe"],
      ValueError("flag --config.save.intermediate=maybe: bad"))
  assert line == ("--config.save.intermediate=maybe: expected True or False "
                  "(the config has True)")
  line = cli.explain_flag_error(
      argv + ["--config.refine.mode.x=1"], AttributeError("x"))
  assert line.startswith("--config.refine.mode.x: no such setting; "
                         "config.refine.mode has nothing")


@pytest.mark.parametrize("change, match", [
    (dict(refine=dict(mode="bogus")), "refine.mode must be one of"),
    (dict(refine=dict(weight_steps=5)), "weight_steps .5. must be ≤"),
    (dict(batch_size=0), "batch_size must be ≥ 1"),
    (dict(embedding=dict(method="sam")), "embedding.method must be one of"),
    (dict(embedding=dict(restyle_iterations=0)),
     "embedding.restyle_iterations must be ≥ 1"),
    (dict(dss=dict(slic_channels="lab")), "dss.slic_channels must be one of"),
    (dict(data=dict(input="MISSING")), "no such file or folder"),
    (dict(data=dict(input="EMPTY")), "no images"),
])
def test_rejected_settings_create_no_workdir(tmp_path, monkeypatch, change,
                                             match):
  monkeypatch.setattr(loading, "load_models", lambda *a: 1 / 0)
  (tmp_path / "empty").mkdir()
  c = _tiny_config()
  data = change.get("data", {}).get("input")
  if data:
    change = dict(data=dict(input=str(
        tmp_path / ("missing" if data == "MISSING" else "empty"))))
  c.update(change)
  workdir = tmp_path / "a" / "out"
  with pytest.raises(run_lib.UserError, match=match):
    run_lib.run(c, str(workdir))
  assert not (tmp_path / "a").exists()


@pytest.mark.parametrize("module", ["stylegan2", "e4e", "farl"])
def test_converters_refuse_a_dst_under_a_file(tmp_path, capsys, module):
  import importlib
  main = importlib.import_module(f"converters.{module}").main
  (tmp_path / "afile").write_text("")
  src = tmp_path / "g.pt"
  src.write_bytes(b"not read: the destination is checked first")
  rc = main(["--src", str(src), "--dst", str(tmp_path / "afile" / "x")])
  err = capsys.readouterr().err.strip().splitlines()
  assert rc == 2 and len(err) == 1
  assert err[0].startswith("error: --dst ") and "afile is a file" in err[0]
  with pytest.raises(SystemExit) as exit_:
    main(["--src", str(src)])
  assert exit_.value.code == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and err[0].startswith("error: ") and "--dst" in err[0]


class _Opaque:
  """A class a checkpoint may name; unpickling it would run code."""


_CONVERTERS = ["stylegan2", "e4e", "farl", "hfgi", "curricularface",
               "deghosting"]


@pytest.mark.parametrize("module", _CONVERTERS)
def test_converters_never_advise_an_unsafe_load(tmp_path, capsys, module):
  # PyTorch's refusal advises re-running with weights_only=False ("will
  # likely succeed"): an arbitrary-code load. The one line says what the
  # file is not instead.
  import importlib
  import pickle
  torch = pytest.importorskip("torch")
  main = importlib.import_module(f"converters.{module}").main
  garbage = tmp_path / "garbage.pt"
  garbage.write_bytes(bytes(range(7, 250, 3)) * 4)
  opaque = tmp_path / "opaque.pt"
  torch.save({"state_dict": {"x": torch.zeros(1)}, "opts": _Opaque()},
             opaque)
  files = [garbage, opaque]
  if module == "stylegan2":  # a raw pickle goes to the NVIDIA reader
    raw = tmp_path / "raw.pkl"
    raw.write_bytes(pickle.dumps({"G_ema": _Opaque()}, protocol=4))
    files.append(raw)
  for src in files:
    rc = main(["--src", str(src), "--dst", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1, err
    line = err[0]
    assert line.startswith(f"error: {src}: "), line
    assert "weights_only=False" not in line and "likely succeed" not in line
    assert "trust" not in line
    if src.suffix == ".pt":
      assert "not a checkpoint this converter reads" in line, line
    else:
      assert "refused global" in line and "nothing in the file was " \
          "executed" in line, line
  assert not (tmp_path / "out").exists()


def test_converter_names_the_object_it_does_not_unpickle(tmp_path, capsys):
  torch = pytest.importorskip("torch")
  from converters import stylegan2
  src = tmp_path / "opaque.pt"
  torch.save({"g_ema": _Opaque()}, src)
  assert stylegan2.main(["--src", str(src), "--dst", str(tmp_path / "o")]) == 2
  assert capsys.readouterr().err.strip() == (
      f"error: {src}: not a checkpoint this converter reads (it stores the "
      f"Python object {__name__}._Opaque, not only tensors and plain "
      "containers; such objects are never unpickled here). Pass the .pt file "
      "as released.")
  src.write_bytes(bytes(range(7, 250, 3)) * 4)
  assert stylegan2.main(["--src", str(src), "--dst", str(tmp_path / "o")]) == 2
  assert capsys.readouterr().err.strip() == (
      f"error: {src}: not a checkpoint this converter reads (UnpicklingError: "
      "Unsupported operand 7). Pass the .pt file as released.")


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="needs /proc")
@pytest.mark.parametrize("module", ["stylegan2", "e4e"])
def test_converters_refuse_a_dst_in_a_folder_that_refuses_writes(
    tmp_path, capsys, module):
  # /proc passes the permission check as root (as on CI) but refuses any
  # new file: the refusal names --dst and the folder, before reading --src.
  import importlib
  main = importlib.import_module(f"converters.{module}").main
  src = tmp_path / "g.pt"
  src.write_bytes(b"not read: the destination is checked first")
  rc = main(["--src", str(src), "--dst", "/proc/x"])
  err = capsys.readouterr().err.strip().splitlines()
  assert rc == 2 and len(err) == 1, err
  if os.geteuid() == 0:
    assert err[0] == ("error: --dst /proc/x: the folder /proc cannot be "
                      "written (No such file or directory); choose another "
                      "--dst")
  else:  # the permission check refuses it first
    assert err[0].startswith("error: --dst /proc/x is not writable")


def test_converter_to_torch_dst_checked_as_a_file(tmp_path, capsys):
  from converters import stylegan2
  (tmp_path / "afile").write_text("")
  rc = stylegan2.main(["--to-torch", "--src", str(tmp_path / "g"), "--dst",
                       str(tmp_path / "afile" / "g.pt")])
  err = capsys.readouterr().err.strip().splitlines()
  assert rc == 2 and len(err) == 1 and "afile is a file" in err[0]
  rc = stylegan2.main(["--to-torch", "--src", str(tmp_path / "g"), "--dst",
                       str(tmp_path)])
  err = capsys.readouterr().err.strip().splitlines()
  assert rc == 2 and len(err) == 1 and "is a folder" in err[0]


def test_help_lists_every_public_name_and_imports_stay_lazy():
  import pydoc
  import dhr_jax
  # `import dhr_jax` loads no JAX (the public names are imported on use).
  p = subprocess.run(
      [sys.executable, "-c", "import sys, dhr_jax; print(sorted(m for m in "
       "sys.modules if m.split('.')[0] in ('jax', 'flax', 'optax', 'orbax', "
       "'torch') or m.startswith('dhr_jax.')))"],
      capture_output=True, text=True, cwd=REPO, timeout=60)
  assert p.returncode == 0 and p.stdout.strip() == "[]", p.stdout + p.stderr
  names = sorted(dhr_jax._EXPORTS)
  assert sorted(dhr_jax.__all__) == names
  assert set(names) <= set(dir(dhr_jax))
  text = pydoc.render_doc(dhr_jax, renderer=pydoc.plaintext)
  entries = text.split("\nCLASSES\n", 1)[1]  # past the module docstring
  for name in names:  # `name(...)`, `class name(...)` or `name = load(...)`
    assert re.search(rf"\n    (class )?{name}(\(| = )", entries), name
  for name in names:  # and the module docstring's overview names it too
    assert name in dhr_jax.__doc__, name


def test_checkpoint_kind_message_grammar(tmp_path):
  from dhr_jax import checkpoint
  checkpoint.save(tmp_path / "c", {"x": np.zeros(2, np.float32)}, "e4e", {})
  with pytest.raises(checkpoint.CheckpointError,
                     match="holds an 'e4e' checkpoint, expected a "
                     "'stylegan2' one"):
    checkpoint.load(tmp_path / "c", "stylegan2")


def test_local_checkpoint_round_trip(tmp_path):
  """local=True (arrays.npz, written by one process alone) reads back as
  orbax's form does: the same nested dicts, the same arrays."""
  import jax
  from dhr_jax import checkpoint
  tree = {"delta": {"0": np.arange(6, dtype=np.float32).reshape(2, 3),
                    "1": np.ones((), np.float32)},
          "exact": {"0": {"index": np.array([1, 4], np.int32),
                          "value": np.array([0.5, -2.0], np.float32)}},
          "codes": np.full((3, 4), 0.25, np.float32)}
  for local in (False, True):
    d = tmp_path / f"local_{local}"
    checkpoint.save(d, tree, "refined", {"k": 1}, local=local)
    assert (d / "arrays.npz").is_file() == local
    got, config = checkpoint.load(d, "refined")
    assert config == {"k": 1}
    flat = lambda t: jax.tree_util.tree_flatten_with_path(t)[0]
    assert [p for p, _ in flat(got)] == [p for p, _ in flat(tree)]
    for (_, a), (_, b) in zip(flat(got), flat(tree)):
      assert a.dtype == b.dtype
      np.testing.assert_array_equal(a, b)
  # The same arrays give the same bytes (fixed time stamps in the zip).
  checkpoint.save(tmp_path / "again", tree, "refined", {"k": 1}, local=True)
  assert ((tmp_path / "again" / "arrays.npz").read_bytes()
          == (tmp_path / "local_True" / "arrays.npz").read_bytes())
  for bad, match in (({"a/b": np.zeros(1)}, "without '/'"),
                     ({"a": [np.zeros(1)]}, "not lists"),
                     ({"a": {}}, "no empty dicts")):
    with pytest.raises(ValueError, match=match):
      checkpoint.save(tmp_path / "bad", bad, "refined", {}, local=True)
  assert not list(tmp_path.glob("bad*"))  # refused before writing anything
  # A damaged file is one clear error, not a zip traceback.
  npz = tmp_path / "local_True" / "arrays.npz"
  npz.write_bytes(npz.read_bytes()[:100])
  with pytest.raises(checkpoint.CheckpointError, match="unreadable"):
    checkpoint.load(tmp_path / "local_True", "refined")
  npz.unlink()
  with pytest.raises(checkpoint.CheckpointError, match="neither arrays/"):
    checkpoint.load(tmp_path / "local_True", "refined")


def test_encoder_generator_mismatch_refused_when_loaded(tmp_path,
                                                        monkeypatch):
  """A 64² generator with a 32² e4e bundle: refused by load_models, before
  LPIPS or any batch."""
  import jax
  from converters import stylegan2 as g_converter
  from dhr_jax.models.stylegan2 import init_generator
  from test_run import _dhr_config, _make_bundle
  bundle = _make_bundle(str(tmp_path))
  G = init_generator(jax.random.PRNGKey(1), size=64, style_dim=512, n_mlp=1,
                     channels=8)
  sd = {k: np.array(v) for k, v in g_converter.to_torch_state_dict(
      G.params, G.noise).items()}
  tree, cfg = g_converter.convert_generator(sd)
  g_converter.write_generator(str(tmp_path / "g64"), tree, cfg)
  c = _dhr_config()
  c.model.checkpoint = bundle
  c.model.generator = str(tmp_path / "g64")
  from dhr_jax.models import lpips
  monkeypatch.setattr(lpips, "load", lambda *a: 1 / 0)
  with pytest.raises(run_lib.UserError) as e:
    loading.load_models(c)
  msg = str(e.value)
  assert "g64" in msg and "predicts 8×512" in msg, msg
  assert "64² generator takes 10×512" in msg, msg


def test_encoder_of_the_wrong_kind_is_one_line_exit_2(tmp_path):
  """An e4e bundle given as ReStyle's encoder: one error line naming what
  the folder holds and what was expected, exit 2, nothing created (pSp's
  is the same path, `loading.load_encoder`)."""
  from test_run import _make_bundle
  bundle = _make_bundle(str(tmp_path))
  Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(tmp_path / "a.png")
  p = _cli(["--config=" + os.path.join(REPO, "configs", "dhr.py"),
            "--config.data.input=" + str(tmp_path / "a.png"),
            "--config.model.checkpoint=" + bundle,
            "--config.model.parser=none",
            "--config.embedding.method=restyle",
            "--workdir=" + str(tmp_path / "out")], tmp_path)
  line = _one_error_line(p)
  assert "model.checkpoint: " in line and bundle in line, line
  assert ("holds an e4e (Encoder4Editing) encoder, expected ReStyle "
          "(ProgressiveBackboneEncoder)") in line, line
  assert "converters.encoder" in line, line
  assert not (tmp_path / "out").exists()


# --------------------------------------------------------------------------
# Inputs much smaller than the generator are named.


def test_upscaling_more_than_twice_is_logged(tmp_path, monkeypatch):
  warnings = []
  monkeypatch.setattr(io.logging, "warning",
                      lambda msg, *a: warnings.append(msg % a))
  rgb = np.random.RandomState(0).randint(0, 256, (8, 8, 3)).astype(np.uint8)
  Image.fromarray(rgb).save(tmp_path / "tiny.png")
  x = io.load_image(tmp_path / "tiny.png", 32)
  assert x.shape == (32, 32, 3)
  assert len(warnings) == 1 and "upscaled 4×" in warnings[0]
  assert "8x8" in warnings[0] and "32x32" in warnings[0]
  Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(tmp_path / "ok.png")
  io.load_image(tmp_path / "ok.png", 32)  # exactly 2×: not worth a word
  assert len(warnings) == 1


# --------------------------------------------------------------------------
# One run per workdir.


def _dead_pid():
  p = subprocess.Popen([sys.executable, "-c", "pass"])
  p.wait()
  return p.pid


def test_workdir_lock_refuses_a_second_holder(tmp_path):
  workdir = tmp_path / "out"
  workdir.mkdir()
  lock = lock_lib.WorkdirLock(workdir).acquire()
  try:
    with pytest.raises(lock_lib.WorkdirBusy) as e:
      lock_lib.WorkdirLock(workdir).acquire()
    assert e.value.pid == os.getpid() and f"pid {os.getpid()}" in str(e.value)
  finally:
    lock.release()
  assert not (workdir / ".lock").exists()
  # A lock file left by a dead process holds no lock: taken over.
  (workdir / ".lock").write_text(f"{_dead_pid()}\n")
  with lock_lib.WorkdirLock(workdir):
    assert (workdir / ".lock").read_text() == f"{os.getpid()}\n"


def test_second_run_into_a_locked_workdir_exits_2(tmp_path):
  workdir = tmp_path / "out"
  workdir.mkdir()
  with lock_lib.WorkdirLock(workdir):
    p = _cli(["--config=" + DEMO, "--workdir=" + str(workdir)], tmp_path)
    line = _one_error_line(p)
    assert f"in use by another run (pid {os.getpid()})" in line
    with pytest.raises(run_lib.UserError, match=f"pid {os.getpid()}"):
      run_lib.edit(_tiny_config(), str(workdir))
  assert sorted(os.listdir(workdir)) == []


# --------------------------------------------------------------------------
# A tiny run: progress, pictures, index.html, tables, the edit pass.


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
  base = tmp_path_factory.mktemp("tiny")
  workdir = str(base / "out")
  config = _tiny_config()
  capture = base / "stderr.txt"
  # The progress bar writes to stderr; keep what it wrote.
  saved = sys.stderr
  warnings, warning = [], run_lib.logging.warning
  run_lib.logging.warning = lambda msg, *a: warnings.append(msg % a)
  with open(capture, "w") as f:
    sys.stderr = f
    try:
      outcome = run_lib.run(config, workdir)
    finally:
      sys.stderr = saved
      run_lib.logging.warning = warning
  return dict(base=base, workdir=workdir, config=config, outcome=outcome,
              stderr=capture.read_text(), warnings=warnings)


def test_demo_runs_without_a_parser_and_records_it(tiny):
  # The stand-in makes no faces: no parser, no warning about it, but
  # summary.json says the DSS is not the paper's.
  assert tiny["config"].model.parser == "none"
  assert not [w for w in tiny["warnings"] if "parser" in w]
  summary = json.load(open(os.path.join(tiny["workdir"], "summary.json")))
  assert summary["dss"] == (
      "no parser: Otsu's threshold of each image's superpixel scores, no "
      "parsing mask, dss.vanished_superpixels='own_pixels'; not the paper's "
      "DSS")


def test_tiny_run_shows_stages_while_a_batch_runs(tiny):
  assert tiny["outcome"].status == 0
  err = tiny["stderr"]
  for stage in ("batch 1/1 (synthetic_0, synthetic_1)", "segmentation",
                "embedding", "refinement step 0/3", "metrics", "edits",
                "writing"):
    assert stage in err, stage
  # Steps are reported from inside the compiled loops (the first and the
  # last always show): DSS's coarse inversion (dss.coarse_steps = 2), then
  # the refinement.
  for k in (0, 1, 2):
    assert f"coarse inversion step {k}/2" in err, k
  assert "refinement step 1/3" in err and "refinement step 3/3" in err
  assert (err.index("coarse inversion step 2/2") < err.index("segmentation")
          < err.index("refinement step 0/3"))


def test_refinement_reports_every_step():
  import jax
  from dhr_jax import refine
  from dhr_jax.models.stylegan2 import init_generator
  G = init_generator(jax.random.PRNGKey(0), size=8, style_dim=8, n_mlp=1,
                     channels=8)
  rng = np.random.RandomState(0)
  codes = rng.randn(3, G.n_latent, 8).astype(np.float32)
  x = rng.uniform(-1, 1, (3, 8, 8, 3)).astype(np.float32)
  m = np.ones((3, 8, 8, 1), np.float32)
  seen = []
  with refine.on_step(seen.append):
    r = refine.hybrid_refine(G, codes, x, m, feature_idx=1, feature_steps=4,
                             weight_steps=2, lpips_lambda=0.0)
    jax.block_until_ready(r.image)
  # Once per step for the batch of 3 under vmap; on CPU the images are
  # refined one after another (refine.map_images), each reporting its steps.
  per_image = jax.default_backend() == "cpu"
  want = [1, 2, 3, 4] * (3 if per_image else 1)
  assert seen == want
  r2 = refine.hybrid_refine(G, codes, x, m, feature_idx=1, feature_steps=4,
                            weight_steps=2, lpips_lambda=0.0)
  np.testing.assert_array_equal(np.asarray(r.image), np.asarray(r2.image))
  assert seen == want  # nobody listening: nothing recorded


def test_grid_has_a_title_over_every_column(tiny):
  d = os.path.join(tiny["workdir"], "synthetic_0")
  grid = np.asarray(Image.open(os.path.join(d, "grid.png")))
  inp = np.asarray(Image.open(os.path.join(d, "input.png")))
  assert inp.shape == (32, 32, 3)
  k, pad = 8, 2   # 32² tiles scaled 8× (nearest) to 256²
  strip = grid.shape[0] - 32 * k
  assert grid.shape[1] == 5 * 32 * k + 4 * pad and 8 <= strip <= 40
  np.testing.assert_array_equal(
      grid[strip:, :32 * k], inp.repeat(k, 0).repeat(k, 1))
  # Gray frames, so that a white mask tile still shows where it ends.
  np.testing.assert_array_equal(grid[strip:, 32 * k:32 * k + pad], 128)
  np.testing.assert_array_equal(grid[strip - 1], 128)
  titles = [grid[:strip, i * (32 * k + pad):i * (32 * k + pad) + 32 * k]
            for i in range(5)]
  for t in titles:
    assert (t < 128).any()  # dark text on the white strip
  assert len({t.tobytes() for t in titles}) == 5  # five different titles
  # The same strip as a picture of the expected titles.
  want = pictures.title_strip(["input", "inversion", "mask (white = in-domain)",
                         "random -2", "random 2"], [32 * k] * 5, pad)
  np.testing.assert_array_equal(grid[:strip], want)


def test_error_map_has_a_colour_bar(tiny):
  d = os.path.join(tiny["workdir"], "synthetic_0")
  pic = np.asarray(Image.open(os.path.join(d, "error_map.png")))
  assert pic.shape[0] == 256 and pic.shape[1] > 256 + 20
  bar = pic[:, 256 + 8 + 7]  # the middle column of the bar
  # White (the map's maximum) at the top, black (0) at the bottom.
  assert bar[1].min() >= 250 and bar[-2].max() <= 5
  assert np.all(np.diff(bar[1:-1, 0].astype(int)) <= 0)


def test_index_html_lists_every_image_with_its_metrics(tiny):
  page = open(os.path.join(tiny["workdir"], "index.html")).read()
  for name in ("synthetic_0", "synthetic_1"):
    assert f"src='{name}/grid.png'" in page
    marker = json.load(open(os.path.join(tiny["workdir"], name,
                                         "done.json")))
    for k in ("psnr", "lpips_alex", "gt_recall"):
      assert f"<td>{marker['metrics'][k]:.4g}</td>" in page
  assert page.index("synthetic_0/") < page.index("synthetic_1/")
  assert "<th>gt_recall</th>" in page and "white = in-domain" in page


def test_edit_pass_counts_failed_images_as_failed(tiny, tmp_path, capsys):
  workdir = str(tmp_path / "copy")
  shutil.copytree(tiny["workdir"], workdir)
  # A damaged refined state (a missing file would make the image unfinished,
  # to be refined again by `run`).
  npz = os.path.join(workdir, "synthetic_1", "refined", "arrays.npz")
  with open(npz, "r+b") as f:
    f.truncate(100)
  outcome = run_lib.edit(tiny["config"], workdir)
  assert outcome.status == 1
  assert outcome.done == ["synthetic_0"]
  assert [f["name"] for f in outcome.failed] == ["synthetic_1"]
  assert outcome.message.startswith("DHR: 1 of 2 images done, 1 failed: ")
  assert capsys.readouterr().out == ""  # the outcome is the only summary
  page = open(os.path.join(workdir, "index.html")).read()
  assert "synthetic_0/grid.png" in page and "synthetic_1/grid.png" not in page
  assert "Failed" in page


def test_results_table_aligns_long_names(capsys):
  rows = [dict(name="a_rather_long_image_name", psnr=21.123456, mse=0.5),
          dict(name="b", psnr=3.0, mse=0.25)]
  loop_lib.print_table(rows, ["name", "psnr", "mse"])
  lines = capsys.readouterr().out.splitlines()
  assert len(lines) == 3
  starts = [[l.index(v) for v in vals] for l, vals in zip(
      lines, [("name", "psnr", "mse"), ("a_rather", "21.12", "0.5"),
              ("b", "3", "0.25")])]
  assert starts[0] == starts[1] == starts[2]


def test_run_whose_only_input_failed_prints_no_mean_line(tmp_path, capsys):
  (tmp_path / "in").mkdir()
  bad = tmp_path / "in" / "x.png"
  bad.write_bytes(b"not a png")
  failed = [dict(name="x", file=str(bad), reason="not an image")]
  outcome = run_lib.finish(_tiny_config(), str(tmp_path), [("x", str(bad))],
                            failed, 0, 0.0, "run")
  out = capsys.readouterr().out
  assert "mean" not in out and out.strip() == ""
  assert outcome.status == 1 and outcome.done == []
  summary = json.load(open(tmp_path / "summary.json"))
  assert summary["means"] == {} and summary["done"] == 0


def test_aligned_run_counts_photos_and_faces_by_name(tmp_path, capsys):
  """With data.align the summary and the last line count photos and faces
  apart: 3 faces of 2 photos done and a third photo without a face is not
  '3 of 4 images'."""
  from dhr_jax import settings
  config = _tiny_config()
  stamp = settings.fingerprint(config)
  faces = [("a/face0", "a0.png"), ("a/face1", "a1.png"), ("b/face0", "b0.png")]
  for name, _ in faces:
    (tmp_path / name).mkdir(parents=True)
    (tmp_path / name / "done.json").write_text(json.dumps(dict(
        name=name, fingerprint=stamp, metrics=dict(mse=0.5), files=[])))
  failed = [dict(name="c", file="c.jpg", reason="no face found")]
  outcome = run_lib.finish(config, str(tmp_path), faces, failed, 0, 0.0,
                           "run", photos=3)
  summary = json.load(open(tmp_path / "summary.json"))
  assert (summary["photos"], summary["photos_failed"], summary["faces"],
          summary["done"]) == (3, 1, 3, 3)
  assert "images" not in summary
  assert outcome.status == 1 and len(outcome.done) == 3
  assert outcome.message.startswith(
      "DHR: 3 of 3 faces of 3 photos done, 1 failed: c.jpg (no face found)")
  # Without alignment the count stays one of images.
  outcome = run_lib.finish(config, str(tmp_path), faces, [], 0, 0.0, "run")
  assert json.load(open(tmp_path / "summary.json"))["images"] == 3
  assert outcome.message.startswith("DHR: 3 of 3 images done in ")
