"""edit.method='diffcam' through run.py: pSp, DiffCam and deghosting stand-ins
saved in the released layouts, converted by the project's converters, run by
`runner.main`; and its settings' refusals."""
import json
import os

import jax
import numpy as np
import pytest
from PIL import Image

from dhr_jax import edits as edits_lib
from dhr_jax import files as files_lib
from dhr_jax import runner
from dhr_jax import settings
from dhr_jax.config_files import load_config
from dhr_jax.models import stylegan2
from dhr_jax.settings import UserError

SIZE = 32  # the generator's, and the deghosting network's output
N_LATENT = 8  # 2·log2(32) − 2
STYLE_DIM = 512  # pSp's codes


def _config(tmp, **model):
  config = load_config("configs/dhr.py")
  config.batch_size = 2
  config.data.input = str(tmp / "inputs")
  config.model.update(dict(checkpoint=str(tmp / "psp"), parser="none",
                           diffcam=str(tmp / "diffcam"),
                           deghosting=str(tmp / "deghosting")))
  config.model.update(model)
  config.embedding.n_mean_latent = 100
  config.edit.method = "diffcam"
  config.edit.directions = (f"Smiling={tmp / 'smile.npy'},"
                            f"mine:3={tmp / 'mine.npy'}")
  return config


def _stand_in(shapes, seed):
  """Seeded weights that keep a deep network's activations O(1): BatchNorm
  statistics near (0, 1), fan-in scaled kernels, scales near 1."""
  rs = np.random.RandomState(seed)
  out = {}
  for key, shape in shapes.items():
    a = rs.standard_normal(shape).astype(np.float32)
    if key.endswith("running_var"):
      a = np.abs(a) * 0.5 + 0.5
    elif key.endswith("weight") and len(shape) >= 2:
      a /= np.sqrt(np.prod(shape[1:]))
    elif key.endswith("weight"):
      a = 1 + 0.1 * a
    else:
      a *= 0.1
    out[key] = a
  return out


@pytest.fixture(scope="module")
def stand_ins(diffcam_stand_ins):
  """`make_stand_ins`' folder, made once a session (conftest.py: the
  browser editor's test uses them too)."""
  return diffcam_stand_ins


def make_stand_ins(tmp):
  """A 32² generator (512-d codes) with its pSp bundle, DiffCam (ResNet-101,
  17 classes) and the 8² → 32² deghosting network of test_deghosting, saved
  as the released files and converted into folder `tmp`; two input photos;
  two directions."""
  torch = pytest.importorskip("torch")
  from converters import deghosting as deghosting_converter
  from converters import diffcam as diffcam_converter
  from converters import encoder as encoder_converter
  from converters import stylegan2 as stylegan2_converter
  import test_deghosting
  t = lambda v: torch.from_numpy(np.array(v, np.float32))
  G = stylegan2.init_generator(jax.random.PRNGKey(0), size=SIZE,
                               style_dim=STYLE_DIM, n_mlp=2, channels=8)
  decoder = stylegan2_converter.to_torch_state_dict(G.params, G.noise)
  encoder = _stand_in(encoder_converter.expected_shapes("psp", N_LATENT), 1)
  torch.save({"state_dict": {**{"encoder." + k: t(v)
                                for k, v in encoder.items()},
                             **{"decoder." + k: t(v)
                                for k, v in decoder.items()}},
              # pSp's codes are offsets from the mean W.
              "latent_avg": t(np.asarray(G.mapping(G.params, jax.random.normal(
                  jax.random.PRNGKey(1), (256, STYLE_DIM))).mean(0))),
              "opts": {"encoder_type": "GradualStyleEncoder", "input_nc": 3,
                       "output_size": SIZE}}, tmp / "psp.pt")
  del encoder
  torch.save({k: t(v) for k, v in _stand_in(
      diffcam_converter.expected_shapes(17), 2).items()},
             tmp / "diff_cam_weight.pt")
  torch.save({k: t(v) for k, v in test_deghosting.tiny_state_dict().items()},
             tmp / "deghosting.pt")
  for main, name, dst in ((encoder_converter.main, "psp.pt", "psp"),
                          (diffcam_converter.main, "diff_cam_weight.pt",
                           "diffcam"),
                          (deghosting_converter.main, "deghosting.pt",
                           "deghosting")):
    assert main(["--src", str(tmp / name), "--dst", str(tmp / dst)]) == 0
    os.remove(tmp / name)
  os.makedirs(tmp / "inputs")
  rs = np.random.RandomState(0)
  for i in range(2):
    ramp = np.linspace(0, 255, SIZE)[None, :, None] * np.ones((SIZE, 1, 3))
    pixels = 0.7 * ramp + 0.3 * rs.uniform(0, 255, (SIZE, SIZE, 3))
    Image.fromarray(pixels.astype(np.uint8)).save(tmp / "inputs" /
                                                  f"p{i}.png")
  np.save(tmp / "smile.npy", rs.standard_normal((1, N_LATENT, STYLE_DIM)))
  np.save(tmp / "mine.npy", rs.standard_normal(STYLE_DIM))
  return tmp


# The stand-ins hold ~160M values (pSp's encoder ~115M, ResNet-101 43M: their
# widths are fixed), drawn, saved and converted: ~2 min on a busy 2-core CPU;
# the run compiles pSp at 256², DiffCam with its gradient, the deghosting
# network and the generator: ~70 s there.
@pytest.mark.slow
def test_run_writes_the_method_outputs(stand_ins, tmp_path, capsys):
  out = tmp_path / "out"
  assert runner.main(_config(stand_ins), str(out), "run") == 0
  summary = json.loads((out / "summary.json").read_text())
  assert summary["done"] == 2 and summary["failed"] == []
  assert summary["dss"].startswith("none")
  labels = ["Smiling_20", "mine_20"]
  nonzero = 0
  for name in ("p0", "p1"):
    d = out / name
    marker = json.loads((d / "done.json").read_text())
    assert marker["edits"] == labels
    # No DSS, no refinement: no mask, no refined state.
    assert not (d / "mask.png").exists() and not (d / "refined").exists()
    assert all(np.isfinite(v) for v in marker["metrics"].values())
    read = lambda rel: files_lib.read_png(str(d / rel)).astype(np.int64)
    x = read("input.png")
    assert read("inversion.png").shape == x.shape
    for label in labels:
      assert f"edits/{label}.png" in marker["files"]
      heat = read(f"diffcam/{label}/heat_map.png")  # gray, read as RGB
      assert heat.shape == (256, 256, 3)  # pSp's input size, where DiffCam runs
      # The heat map at the photo's size, as the blend reads it (nearest).
      h = heat[(np.arange(SIZE) * 256) // SIZE][:, (np.arange(SIZE) * 256)
                                                 // SIZE, 0]
      fused = read(f"diffcam/{label}/fused.png")
      deghosted = read(f"edits/{label}.png")
      # Outside the edit region the fused image is the photo itself: where
      # the written map is 0, h < 0.5/255 moves a pixel by less than
      # 0.5/255·2 in [-1, 1], under one grey level after rounding.
      assert np.all(np.abs(fused - x)[h == 0] <= 1)
      empty = label in marker.get("empty_heat_map", [])
      assert empty == (heat.max() == 0)
      if not empty:
        nonzero += 1
        assert np.abs(deghosted - x)[h > 0].mean() > 1
      read(f"diffcam/{label}/manipulated.png")
    grid = files_lib.read_png(str(d / "grid.png"))
    # input, inversion, then a heat map and an edit per direction, each
    # scaled up to 256: 6 tiles 2 px apart.
    assert grid.shape[1] == 6 * 256 + 5 * 2
  assert nonzero > 0
  empty = {n: json.loads((out / n / "done.json").read_text()).get(
      "empty_heat_map") for n in ("p0", "p1")}
  assert summary.get("empty_heat_map", {}) == {
      n: v for n, v in empty.items() if v}
  # The page says what the grids show (not DSS's mask).
  page = (out / "index.html").read_text()
  assert "DiffCam's heat map" in page and "mask" not in page


@pytest.mark.slow
def test_refuses_unusable_models(stand_ins, tmp_path, capsys):
  def error(**model):
    assert runner.main(_config(stand_ins, **model), str(tmp_path / "o"),
                       "run") == 2
    return _error_line(capsys)
  # Not a pSp encoder (here the DiffCam): the converter named.
  assert "converters.encoder" in error(checkpoint=str(stand_ins / "diffcam"))
  assert "converters.deghosting" in error(deghosting="")
  assert "converters.diffcam" in error(diffcam=str(stand_ins / "nothing"))
  assert not (tmp_path / "o").exists()


def _error_line(capsys):
  """The refusal: stderr's last line (absl's log lines may come before)."""
  err = capsys.readouterr().err.strip().splitlines()[-1]
  assert err.startswith("error: ")
  return err


def test_refuses_missing_psp_and_edit_mode(tmp_path, capsys):
  config = _config(tmp_path)
  os.makedirs(tmp_path / "inputs")
  Image.new("RGB", (SIZE, SIZE)).save(tmp_path / "inputs" / "a.png")
  assert runner.main(config, str(tmp_path / "o"), "run") == 2
  assert "converters.encoder" in _error_line(capsys)
  config.model.checkpoint = "stand-in"
  assert runner.main(config, str(tmp_path / "o"), "run") == 2
  assert "needs pSp" in capsys.readouterr().err
  os.makedirs(tmp_path / "o")
  assert runner.main(config, str(tmp_path / "o"), "edit") == 2
  assert "run it again" in capsys.readouterr().err
  config.edit.method = "other"
  assert runner.main(config, str(tmp_path / "o"), "run") == 2
  assert "edit.method must be one of dhr, diffcam" in (
      capsys.readouterr().err)


class _G:
  n_latent, config = N_LATENT, {"style_dim": STYLE_DIM}


def test_directions_need_a_class(tmp_path):
  np.save(tmp_path / "d.npy", np.ones((N_LATENT, STYLE_DIM), np.float32))
  edit = _config(tmp_path).edit

  def specs(directions, **kw):
    edit.update(dict(directions=directions, **kw))
    return edits_lib.from_config(edit, _G(), num_classes=17)
  (spec,) = specs(f"Old={tmp_path / 'd.npy'}", alpha=2.5)
  assert (spec.kind, spec.target, spec.labels) == ("diffcam", 16, ("Old_2.5",))
  # w + α·d/‖d‖ (the published normalisation, over the whole direction).
  moved = np.asarray(spec.fn(np.zeros((1, N_LATENT, STYLE_DIM))))
  np.testing.assert_allclose(np.linalg.norm(moved), 2.5, rtol=1e-6)
  (spec,) = specs(f"smirk:4={tmp_path / 'd.npy'}")
  assert (spec.name, spec.target) == ("smirk", 4)
  for bad, why in ((f"smirk={tmp_path / 'd.npy'}", "Bushy_Eyebrows"),
                   (f"smirk:17={tmp_path / 'd.npy'}", "below 17"),
                   (f"smirk:x={tmp_path / 'd.npy'}", "whole number"),
                   ("", "needs directions")):
    with pytest.raises(UserError, match=why) as e:
      specs(bad)
    assert "\n" not in str(e.value)
  with pytest.raises(UserError, match="no DiffCam class"):
    specs(f"Old={tmp_path / 'd.npy'}", random_direction_seed=0)
  # Two edits of one label would write over each other's files.
  with pytest.raises(UserError, match="two edits the same name"):
    specs(f"Old={tmp_path / 'd.npy'},Old:3={tmp_path / 'd.npy'}",
          random_direction_seed=-1)


def test_browser_editor_refuses_missing_psp(tmp_path):
  from dhr_jax import editor
  config = _config(tmp_path)  # its checkpoints do not exist
  with pytest.raises(UserError, match="converters.encoder"):
    editor.Editor(config, str(tmp_path / "o"))


def test_index_says_what_the_pictures_are(tmp_path):
  from dhr_jax import workdir
  pages = {}
  for method in ("dhr", "diffcam"):
    workdir.write_index(str(tmp_path), [dict(name="p0", dir="p0", psnr=1.0)],
                        ["name", "psnr"], method=method)
    pages[method] = (tmp_path / "index.html").read_text()
  assert "mask (white = in-domain" in pages["dhr"]
  assert "heat map" not in pages["dhr"]
  page = pages["diffcam"]
  for what in ("inversion (pSp's codes", "DiffCam's heat map",
               "manipulated.png", "fused.png", "deghosted",
               "<td>p0</td><td>1</td>"):
    assert what in page, what
  assert "mask" not in page


def test_dhr_fingerprint_ignores_the_diffcam_settings():
  config = load_config("configs/dhr.py")
  stamp = settings.fingerprint(config)
  config.model.diffcam = "elsewhere"
  config.edit.alpha = 3.0
  assert settings.fingerprint(config) == stamp
  config.edit.method = "diffcam"
  other = settings.fingerprint(config)
  config.edit.alpha = 4.0
  assert settings.fingerprint(config) not in (stamp, other)
  # Settings diffcam does not use leave its markers valid.
  moved = settings.fingerprint(config)
  config.refine.feature_steps = 7
  config.dss.coarse_steps = 3
  config.model.parser = "elsewhere"
  assert settings.fingerprint(config) == moved


def _compare_config(tmp):
  """configs/compare.py on the stand-ins: pSp embeds the run and is the
  encoder of config.compare.encoders (the Diff-CAM row's pSp: its codes
  are the shared embedding's), DHR with test_cli's tiny DSS and
  refinement."""
  config = load_config("configs/compare.py")
  c = _config(tmp)
  config.update(dict(batch_size=2, data=c.data.to_dict(),
                     model=c.model.to_dict(), edit=c.edit.to_dict()))
  config.update_from_flattened_dict({
      "embedding.method": "psp", "embedding.n_mean_latent": 100,
      "dss.coarse_steps": 2, "dss.n_segments": 8, "refine.feature_idx": 3,
      "refine.feature_steps": 3, "refine.weight_steps": 2,
      "compare.methods": "dhr",
      "compare.encoders": f"psp={config.model.checkpoint}"})
  return config


def test_compare_refuses_diffcam_without_psp(tmp_path, capsys, monkeypatch):
  from types import SimpleNamespace as NS
  from dhr_jax import compare
  config = _compare_config(tmp_path)
  config.embedding.method, config.compare.encoders = "e4e", ""
  assert runner.main(config, str(tmp_path / "o"), "compare") == 2
  assert "config.compare.encoders (psp=DIR)" in _error_line(capsys)
  assert not (tmp_path / "o").exists()
  # The row's pSp: config.compare.encoders' first, else the run's own.
  psp, e4e = NS(config={"arch": "psp"}), NS(config={"arch": "e4e"})
  assert compare.diffcam_method(NS(encoders={}, encoder=psp)) == "diffcam"
  assert compare.diffcam_method(NS(encoders=dict(a=e4e, mine=psp),
                                   encoder=psp)) == "diffcam@mine"
  # None loaded (its folder was missing): the row is left out, one warning.
  models = NS(encoders=dict(a=e4e), encoder=e4e, hfgi=None)
  assert compare.diffcam_method(models) is None
  config.compare.encoders = "a=DIR"
  said = []
  monkeypatch.setattr(compare.logging, "warning",
                      lambda msg, *a: said.append(msg % a))
  keys, _ = compare.table1_methods(config, ("dhr", "diffcam"), models)
  assert keys == ["dhr@a"]
  assert len(said) == 1 and "Diff-CAM (pSp) left out" in said[0]
  monkeypatch.undo()
  config.edit.method = "dhr"
  config.compare.methods = "dhr,diffcam"
  with pytest.raises(UserError, match="--config.edit.method=diffcam"):
    compare.validate(config)


# DSS, the pSp embedding and DHR's refinement compile here; pSp, DiffCam
# and the deghosting network come from test_run_writes_the_method_outputs'
# cache: 41–60 s after it, 80 s alone (x86_64 Xeon, 2 shared cores).
@pytest.mark.slow
def test_compare_has_the_diffcam_row(stand_ins, tmp_path, monkeypatch):
  """Diff-CAM (pSp) beside DHR on the same directions: DHR renders
  w + α·d/‖d‖ with its refined generator, the Diff-CAM row's edits are the
  differential edits of the same input."""
  import csv
  from dhr_jax import compare
  from dhr_jax import differential
  from dhr_jax import loading
  loaded, grids = [], []
  load = loading.load_models
  monkeypatch.setattr(loading, "load_models",
                      lambda *a, **k: loaded.append(load(*a, **k)) or
                      loaded[-1])
  grid = compare.grid
  monkeypatch.setattr(compare, "grid", lambda *a: grids.append(a) or grid(*a))
  out = tmp_path / "out"
  config = _compare_config(stand_ins)
  assert runner.main(config, str(out), "compare") == 0
  with open(out / "compare.csv") as f:
    rows = {r["method"]: r for r in csv.DictReader(f)}
  assert list(rows) == ["DHR (pSp)", "Diff-CAM (pSp)"]
  assert all(r["images"] == "2" for r in rows.values())
  (models,) = loaded
  specs = edits_lib.from_config(config.edit, models.G, num_classes=17)
  labels = ["Smiling_20", "mine_20"]
  assert [l for s in specs for l in s.labels] == labels
  assert len(grids) == 2  # one per image
  for _, mask, results, titles, _ in grids:
    assert mask is not None  # DSS's, from DHR's result
    assert titles["diffcam@psp"] == "Diff-CAM (pSp)"
    assert list(results["dhr@psp"].edits) == list(
        results["diffcam@psp"].edits) == labels
  x = np.stack([g[0] for g in grids])
  for spec in specs:
    want = differential.differential_edit(
        models.encoder, models.G, models.diffcam, models.deghosting,
        x, spec.direction, spec.target, spec.strengths[0]).deghosted
    # The same programs on the same batch: the same numbers.
    np.testing.assert_array_equal(
        np.stack([g[2]["diffcam@psp"].edits[spec.labels[0]]
                  for g in grids]),
        np.asarray(want))
  assert (out / "p0" / "diffcam" / "Smiling_20" / "heat_map.png").exists()
