"""CurricularFace IR-101 (the paper's ID network): golden parity through the
released file layout, converter refusals, the 112² identity crop against
the official MTCNN alignment, the metric."""
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import dhr_jax
from conftest import rel_l2
from converters import curricularface as cf_converter
from dhr_jax import alignment
from dhr_jax import identity
from dhr_jax.models import curricularface as cf

FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures")


def _torch():
  return pytest.importorskip("torch")


def _entries(golden):
  manifest, _ = golden("curricularface_ir101")
  return [(k, tuple(s), d) for k, s, d in manifest["entries"]]


def _convert_cli(src, dst, capsys):
  code = cf_converter.main(["--src", str(src), "--dst", str(dst)])
  return code, capsys.readouterr().err


# --------------------------------------------------------------------------
# Converter


def test_expected_shapes_match_released_layout(golden):
  released = {k: s for k, s, d in _entries(golden)
              if not k.endswith("num_batches_tracked")}
  assert cf_converter.expected_shapes() == released


def test_converted_tree_matches_model_parameters(golden):
  sd = {k: np.broadcast_to(np.float32(0), s)
        for k, s, d in _entries(golden) if d != "int64"}
  tree, config = cf_converter.convert_state_dict(sd, "golden layout")
  assert config == cf.make_config()
  want = jax.tree_util.tree_map(lambda a: a.shape, cf.param_shapes())
  got = jax.tree_util.tree_map(lambda a: a.shape, tree["params"])
  assert got == want


@pytest.mark.slow
def test_golden_parity(tmp_path, capsys, rule, golden):
  """Released layout (a plain state dict) → converter → loader → embed."""
  torch = _torch()
  manifest, ref = golden("curricularface_ir101")
  sd = rule.state_dict_from_manifest(manifest)
  src = tmp_path / "CurricularFace_Backbone.pth"
  torch.save({k: torch.from_numpy(np.ascontiguousarray(v))
              for k, v in sd.items()}, src)
  del sd
  dst = tmp_path / "curricularface"
  code, err = _convert_cli(src, dst, capsys)
  assert code == 0, err
  os.remove(src)

  net = dhr_jax.load_id_network(dst)
  x = jnp.asarray(ref["input"].transpose(0, 2, 3, 1))
  emb = np.asarray(net.embed(net.params, x))
  err_emb = rel_l2(emb, ref["embedding"])
  err_sim = rel_l2(emb @ emb.T, ref["similarity"])
  print(f"IR-101 parity: embedding {err_emb:.2e}, similarity {err_sim:.2e}")
  # The forward parity level (1e-4 relative); float32 forward
  # errors of such trunks are ~1e-6 (StyleGAN2: 5.8e-7 from float64, bench/
  # float_precision.py).
  assert err_emb <= 1e-4 and err_sim <= 1e-4
  np.testing.assert_allclose(np.linalg.norm(emb, axis=-1), 1.0, atol=1e-6)


def test_refuses_bad_files(tmp_path, capsys, golden):
  torch = _torch()
  missing = tmp_path / "none.pth"
  code, err = _convert_cli(missing, tmp_path / "a", capsys)
  assert code == 2 and "no such file" in err and len(err.splitlines()) == 1
  junk = tmp_path / "junk.pth"
  junk.write_bytes(b"not a checkpoint")
  code, err = _convert_cli(junk, tmp_path / "b", capsys)
  assert code == 2 and "not a checkpoint this converter reads" in err
  assert len(err.splitlines()) == 1
  bundle = tmp_path / "bundle.pth"
  torch.save({"state_dict": {"encoder.x": torch.zeros(1)}, "opts": {}},
             bundle)
  code, err = _convert_cli(bundle, tmp_path / "c", capsys)
  assert code == 2 and "not a plain state dict" in err
  assert len(err.splitlines()) == 1
  # Another network's state dict: one line, no key listing.
  other = tmp_path / "other.pth"
  torch.save({"conv.weight": torch.zeros(2, 3, 3, 3)}, other)
  code, err = _convert_cli(other, tmp_path / "d", capsys)
  assert code == 2 and "not IR_101" in err and len(err.splitlines()) == 1
  # The IR-101 layout with one tensor mis-shaped: the key is named.
  sd = {k: torch.zeros((), dtype=torch.int64 if d == "int64" else
                       torch.float32).expand(s)
        for k, s, d in _entries(golden)}
  sd["output_layer.3.bias"] = torch.zeros(7)
  bad = tmp_path / "bad.pth"
  torch.save(sd, bad)
  code, err = _convert_cli(bad, tmp_path / "e", capsys)
  assert code == 2 and "output_layer.3.bias" in err
  assert not any((tmp_path / d).exists() for d in "abcde")


def test_loader_refuses_other_checkpoints(tmp_path):
  from dhr_jax import checkpoint
  checkpoint.save(tmp_path / "x", {"params": {"a": np.zeros(2)}}, "e4e", {})
  with pytest.raises(checkpoint.CheckpointError, match="'e4e'"):
    dhr_jax.load_id_network(tmp_path / "x")


# --------------------------------------------------------------------------
# The 112² crop against the official MTCNN alignment


@pytest.fixture(scope="module")
def official_crops():
  with np.load(os.path.join(FIXTURES, "mtcnn_crops_112.npz")) as f:
    return {k: f[k] for k in f.files}


def test_reference_points_are_the_official_ones(official_crops):
  np.testing.assert_array_equal(alignment.IDENTITY_REFERENCE_112,
                                official_crops["reference"])


def test_transform_matches_official(official_crops):
  for name, points, tfm in zip(official_crops["names"],
                               official_crops["points"],
                               official_crops["tfm"]):
    m = alignment.identity_transform(points)
    # The same float64 least squares as the official code (measured: equal
    # to the last bit here); 1e-9 leaves room for another LAPACK's order of
    # operations on a 10×4 system (~1e-13 relative).
    np.testing.assert_allclose(m, tfm, rtol=1e-9, atol=1e-9, err_msg=name)
  # The mirrored point set takes the official fit's mirrored branch.
  mirrored = list(official_crops["names"]).index("mirrored_labels")
  assert np.linalg.det(official_crops["tfm"][mirrored][:, :2]) < 0


def test_crop_matches_official_warp_and_crop_face(official_crops):
  from skimage import data
  image = data.astronaut()
  crops = np.asarray(alignment.identity_crops(
      np.repeat(image[None], len(official_crops["names"]), 0),
      official_crops["points"]))
  diff = np.abs(crops - official_crops["crops"].astype(np.float32))
  print(f"crop vs warp_and_crop_face: max {diff.max():g} grey levels, "
        f"{(diff > 0).mean():.2e} of values differ")
  # Measured: max 1 grey level on ≤ 2.1e-4 of a case's values, 8e-5 of all
  # (cv2 5.1 and ours round float bilinear values that land within float
  # error of a half differently); cv2 4.10's fixed-point warp is 4 levels
  # and 11 % of the values away, so 1e-2 tells the two apart.
  assert diff.max() <= 1
  assert (diff > 0).mean() < 1e-2


# --------------------------------------------------------------------------
# The metric


def test_saved_uint8_truncates_like_tensor2im():
  x = np.array([-1.5, -1.0, -0.999, 0.0, 0.5, 0.99999, 1.0, 2.0], np.float32)
  # tensor2im: ((x + 1) / 2) clipped to [0, 1], × 255, astype(uint8).
  want = np.array([0, 0, 0, 127, 191, 254, 255, 255], np.uint8)
  np.testing.assert_array_equal(identity.saved_uint8(x), want)


class _PixelNet:
  """Stands in for the IR-101 (whose parity is the golden test's): the
  l2-normalised pixels of the crop's centre, so the metric's plumbing is
  checked without compiling 49 units."""
  params = None

  def embed(self, params, crops):
    del params
    assert crops.shape[1:] == (112, 112, 3)
    e = jnp.reshape(crops[:, 40:72, 40:72], (crops.shape[0], -1))
    return e / jnp.linalg.norm(e, axis=-1, keepdims=True)


@pytest.fixture(scope="module")
def small_net():
  return _PixelNet()


def test_metric_same_face_and_no_face(small_net, official_crops):
  faces = pytest.importorskip("dhr_jax.faces")
  try:
    models = faces.load_models(recognition=False)
  except faces.FacesUnavailable as e:
    pytest.skip(str(e))
  from skimage import data
  image = data.astronaut()
  target = image[None].astype(np.float32) / 127.5 - 1.0
  blank = np.zeros_like(target)
  got = identity.id_curricularface(
      small_net, np.concatenate([image[None], blank.astype(np.uint8)]),
      np.concatenate([target, target]), models)
  # The same picture: the same crop (the target's floats round back to its
  # uint8 pixels); float32 embeddings of unit norm within 1e-7.
  assert abs(got[0] - 1.0) < 1e-5 and np.isnan(got[1])
  # dlib's five points of the astronaut are the fixture's 'detected' ones.
  five = identity.five_landmarks(models, image)
  np.testing.assert_allclose(five, official_crops["points"][0], atol=1e-4)
  assert identity.metrics(small_net, models, target[0], blank[0]) == {}
  m = identity.metrics(small_net, models, target[0], image)
  assert set(m) == {"id_curricularface"}
  assert abs(m["id_curricularface"] - 1.0) < 1e-5


def test_similarity_is_dot_of_embeddings(small_net):
  rs = np.random.RandomState(0)
  imgs = rs.randint(0, 256, (2, 64, 64, 3)).astype(np.uint8)
  pts = alignment.IDENTITY_REFERENCE_112[None].repeat(2, 0) * 0.5 + 3.0
  s = identity.similarity(small_net, imgs, imgs[::-1], pts, pts)
  crops = alignment.identity_crops(imgs, pts) / 127.5 - 1.0
  emb = np.asarray(small_net.embed(small_net.params, crops), np.float64)
  # Float32 embeddings (unit norm within 1e-7): their dot product agrees
  # with the float64 one to ~1e-7; 1e-5 leaves 100×.
  np.testing.assert_allclose(s, np.sum(emb * emb[::-1], -1), atol=1e-5)
  np.testing.assert_allclose(np.linalg.norm(emb, axis=-1), 1.0, atol=1e-6)


def test_run_refuses_missing_id_network(tmp_path, monkeypatch):
  from PIL import Image
  from dhr_jax import loading
  from dhr_jax import runner
  from dhr_jax.config_files import load_config
  inputs = tmp_path / "in"
  inputs.mkdir()
  Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(inputs / "a.png")
  config = load_config(os.path.join(os.path.dirname(FIXTURES), os.pardir,
                                    "configs", "dhr.py"))
  assert config.model.id_network == ""   # off by default
  config.data.input = str(inputs)
  config.model.id_network = str(tmp_path / "idnet")
  monkeypatch.setattr(loading, "face_models", lambda c: object())
  with pytest.raises(runner.UserError,
                     match=r"python -m converters\.curricularface .*idnet"):
    runner.run(config, str(tmp_path / "out"))
  assert not (tmp_path / "out").exists()
