"""Faces on real photos: detection, FFHQ alignment, paste-back, dlib identity.

Real data: skimage's astronaut (Eileen Collins) and cameraman photographs.
Needs the `faces` extra (dlib-bin, face-recognition-models; part of the
`test` extra). dlib's HOG detector, shape predictor and face descriptor are
deterministic, so the numbers in the comments below are what these models
give on these photos; the margins to the assertions are stated with them.
"""
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image
from skimage import data

from dhr_jax import alignment
from dhr_jax import faces
from dhr_jax import files as files_lib
from dhr_jax import workdir as workdir_lib
from dhr_jax.config_files import load_config

pytest.importorskip("dlib")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The astronaut's face as dlib's HOG detector boxes it (upsample 1).
ASTRONAUT_FACE = (175, 76, 265, 166)


@pytest.fixture(scope="module")
def models():
  return faces.load_models()


def _iou(a, b):
  ix = max(0, min(a[2], b[2]) - max(a[0], b[0]))
  iy = max(0, min(a[3], b[3]) - max(a[1], b[1]))
  inter = ix * iy
  area = lambda r: (r[2] - r[0]) * (r[3] - r[1])
  return inter / (area(a) + area(b) - inter)


def _psnr(x, y):
  mse = np.mean((np.asarray(x, np.float64) - np.asarray(y, np.float64)) ** 2)
  return 10 * np.log10(255.0 ** 2 / mse)


def _grey_rgb(image):
  return np.ascontiguousarray(np.stack([image] * 3, -1))


def test_astronaut_real_face_is_chosen_not_the_patch(models):
  photo = data.astronaut()
  everything = faces.detect(models, photo, min_score=-1.0)
  # Measured: the face scores 1.16; a box on the mission patch
  # (126, 335)-(215, 425) scores 0.12, about as large as the face, so only
  # the score separates them.
  patch = [f for f in everything if _iou(f.box, (126, 335, 215, 425)) > 0.5]
  assert patch and 0.0 < patch[0].score < faces.MIN_SCORE
  kept = faces.detect(models, photo)
  assert len(kept) == 1
  chosen = faces.select(kept, "largest")[0]
  assert _iou(chosen.box, ASTRONAUT_FACE) > 0.9
  assert chosen.score > 1.0
  # The five points lie inside the face box, eyes above the mouth.
  five = chosen.five
  l, t, r, b = chosen.box
  assert np.all((five[:, 0] > l) & (five[:, 0] < r) & (five[:, 1] > t) &
                (five[:, 1] < b))
  assert five[0, 0] < five[1, 0] and five[3, 0] < five[4, 0]
  assert max(five[0, 1], five[1, 1]) < five[2, 1] < min(five[3, 1], five[4, 1])


def test_large_photos_are_searched_downscaled(models):
  photo = data.astronaut()
  big = np.asarray(Image.fromarray(photo).resize((1024, 1024), Image.LANCZOS))
  (face,) = faces.detect(models, big, max_side=512)
  doubled = tuple(2 * v for v in ASTRONAUT_FACE)
  # Measured: box (350, 152, 530, 332), IoU 0.98 with the doubled box.
  assert _iou(face.box, doubled) > 0.9
  # Landmarks come from the full-resolution photo: measured within 1.5 px
  # of the 512² photo's, doubled (pixel centres: 2 x + 0.5), and within
  # 1.0 px of those found when the 1024² photo itself is searched
  # (max_side=0; the predictor starts from a slightly different box).
  small = faces.detect(models, photo)[0]
  full = faces.detect(models, big, max_side=0)[0]
  np.testing.assert_allclose(face.five, 2 * small.five + 0.5, atol=2.0)
  np.testing.assert_allclose(face.five, full.five, atol=2.0)


@pytest.fixture(scope="module")
def astronaut_aligned(models):
  photo = data.astronaut()
  (al,) = faces.align_faces(models, photo, 256)
  return photo, al


def test_alignment_puts_the_eyes_on_the_ffhq_template(models,
                                                      astronaut_aligned):
  _, al = astronaut_aligned
  assert al.image.shape == (256, 256, 3) and al.image.dtype == np.uint8
  again = faces.detect(models, al.image)
  assert len(again) == 1
  eyes = again[0].five[:2]
  template = alignment.ffhq_landmarks(256)[:2]
  err = np.linalg.norm(eyes - template, axis=1) / 256
  # Measured: 0.79 % and 0.71 % of the side (0.73 % / 0.77 % at 512²); the
  # acceptance bound is 2 %.
  assert np.all(err < 0.02), err


def test_aligned_landmarks_map_back_onto_the_photo(models, astronaut_aligned):
  photo, al = astronaut_aligned
  again = faces.detect(models, al.image)[0]
  back = faces.photo_landmarks(al.quad, 256, again.landmarks)
  # Measured: 0.40 px mean distance at 256² (0.33 px at 512²): the shape
  # predictor's own jitter on a resampled face. A transform off by one
  # aligned pixel would move them by qsize/256 ≈ 0.68 photo px on average
  # on top of that.
  err = np.linalg.norm(back - al.face.landmarks, axis=1).mean()
  assert err < 0.75, err


def test_paste_back_of_the_unchanged_crop_reproduces_the_photo(
    astronaut_aligned):
  photo, al = astronaut_aligned
  pasted, weight = faces.paste(photo, al.image, al.quad)
  outside = weight == 0
  assert 0.05 < np.mean(~outside) < 0.5
  # Bit-identical wherever the feathered mask is zero.
  assert np.array_equal(pasted[outside], photo[outside])
  l, t, r, b = al.face.box
  # Measured: 37.2 dB in the face box at 256² (42.6 dB at 512², 26.8 dB at
  # 64²: what survives Lanczos down- and bilinear up-sampling); the
  # acceptance bound is 35 dB.
  psnr = _psnr(pasted[t:b, l:r], photo[t:b, l:r])
  assert psnr >= 35.0, psnr
  # Float images in [-1, 1] at another size go back the same way.
  as_float = al.image.astype(np.float32) / 127.5 - 1.0
  again, weight2 = faces.paste(photo, as_float, al.quad)
  np.testing.assert_array_equal(weight2, weight)
  assert np.array_equal(again[outside], photo[outside])
  assert _psnr(again[t:b, l:r], photo[t:b, l:r]) >= 35.0


def test_paste_mask_limits_the_change(astronaut_aligned):
  photo, al = astronaut_aligned
  # A grey square pasted with a mask over the aligned frame's left half only.
  grey = np.full((64, 64, 3), 128, np.uint8)
  mask = np.zeros((64, 64), np.float32)
  mask[:, :32] = 1.0
  pasted, weight = faces.paste(photo, grey, al.quad, mask=mask)
  changed = np.any(pasted != photo, -1)
  assert not np.any(changed & (weight == 0))
  # The right half of the aligned square (around the image's right eye,
  # mapped into the photo) is untouched.
  right = faces.photo_landmarks(al.quad, 64, [[56.0, 32.0]])[0]
  x, y = np.rint(right).astype(int)
  assert weight[y, x] == 0 and np.array_equal(pasted[y, x], photo[y, x])
  left = faces.photo_landmarks(al.quad, 64, [[16.0, 32.0]])[0]
  x, y = np.rint(left).astype(int)
  assert weight[y, x] == 1 and np.array_equal(pasted[y, x], [128] * 3)


def _ramp_photo(axis):
  yy, xx = np.mgrid[:800, :800].astype(np.float64)
  c = xx if axis == 0 else yy
  # Rising in channel 0, falling in channel 1: PIL's 8-bit resampling bias
  # (about -0.25 grey levels in its bilinear transform) is the same in
  # both, a geometric shift has opposite signs.
  return np.uint8(np.rint(np.stack([0.3 * c, 239.7 - 0.3 * c, 0.3 * c], -1)))


@pytest.mark.parametrize("size,transform_size", [(32, None), (48, 48),
                                                 (64, None), (200, None)])
def test_alignment_transform_is_exact_with_and_without_shrink(
    size, transform_size):
  # A face-like quad (eyes 100 px apart) well inside an 800² photo; at these
  # output sizes the recipe first shrinks the photo by 6, 4, 3 and 1.
  lm = np.zeros((68, 2))
  lm[36:42] = (350, 380)
  lm[42:48] = (450, 390)
  lm[48] = (365, 480)
  lm[54] = (435, 487)
  for axis in (0, 1):
    al = faces.align(_ramp_photo(axis), lm, size,
                     transform_size=transform_size)
    m = faces.aligned_to_photo(al.quad, size)
    jj, ii = np.meshgrid(np.arange(size), np.arange(size))
    p = (np.stack([jj, ii, np.ones_like(jj)], -1) @ m.T)[..., axis]
    e = (al.image[..., :2] - np.stack([0.3 * p, 239.7 - 0.3 * p], -1))
    e = e[3:-3, 3:-3]  # Lanczos rings at the crop's edges
    shift = (e[..., 0] - e[..., 1]).mean() / 0.6
    # Measured: |shift| ≤ 0.042 photo px at every size here; taking the
    # recipe's quad / shrink as the footprint instead is off by 0.5 to
    # 3.5 px (the shrunk photo's size is rounded).
    assert abs(shift) < 0.1, (axis, shift)


def _two_face_photo():
  # No second colour face photo ships with the installed packages (the
  # cameraman scores -0.11, a rejected detection), so the second face is
  # the astronaut mirrored and scaled to 3/4.
  a = data.astronaut()
  b = np.asarray(Image.fromarray(a[:, ::-1]).resize((384, 384),
                                                    Image.LANCZOS))
  photo = np.zeros((512, 512 + 384, 3), np.uint8)
  photo[:, :512] = a
  photo[64:448, 512:] = b
  return photo


def test_two_faces_all_are_aligned_and_pasted_into_one_photo(models):
  photo = _two_face_photo()
  results = faces.align_faces(models, photo, 256, "all")
  assert len(results) == 2
  assert _iou(results[0].face.box, ASTRONAUT_FACE) > 0.9
  assert results[1].face.box[0] > 512  # the mirrored one, on the right
  assert len(faces.align_faces(models, photo, 256, "largest")) == 1
  pasted, weight = faces.paste_all(photo, [(r.image, r.quad)
                                           for r in results])
  outside = weight == 0
  assert np.array_equal(pasted[outside], photo[outside])
  for r in results:
    l, t, rr, b = r.face.box
    # Measured: 37.2 dB (astronaut) and 38.4 dB (the smaller mirrored face,
    # upsampled more by the alignment).
    assert _psnr(pasted[t:b, l:rr], photo[t:b, l:rr]) >= 35.0
  # Each paste changed pixels near its own face.
  for r in results:
    cx, cy = np.rint(r.face.five[2]).astype(int)
    assert weight[cy, cx] == 1


def test_id_dlib_same_shifted_and_different_faces(models):
  a = data.astronaut()
  # The same image twice gives the same descriptor; the float64 cosine of
  # a vector with itself is 1 to ~1e-16.
  assert abs(faces.id_dlib(models, a, a) - 1.0) < 1e-6
  shifted = np.zeros_like(a)
  shifted[2:, 2:] = a[:-2, :-2]
  same = faces.id_dlib(models, a, shifted)
  other = faces.id_dlib(models, a, _grey_rgb(data.camera()), min_score=-0.5)
  # Measured: 0.9997 for the copy shifted by 2 px (0.9994 / 0.9997 for 1 /
  # 4 px), 0.838 for the cameraman (dlib's descriptors are not centred, so
  # different people still have cosine ≈ 0.8).
  assert same > 0.99, same
  assert other < 0.9, other
  # Without a face: NaN, not a number that looks like a similarity.
  assert np.isnan(faces.id_dlib(models, a, np.zeros_like(a)))


def test_landmarks_or_template(models, astronaut_aligned):
  _, al = astronaut_aligned
  five, found = faces.landmarks_or_template(models, al.image)
  assert found
  np.testing.assert_array_equal(five, faces.detect(models, al.image)[0].five)
  blank = np.full((256, 256, 3), 127, np.uint8)
  five, found = faces.landmarks_or_template(models, blank)
  assert not found
  np.testing.assert_array_equal(five, alignment.ffhq_landmarks(256))


def test_package_works_without_the_faces_extra():
  # As after a plain `pip install -e .`: dlib and face_recognition_models
  # cannot be imported. The package, the pipeline and the demo config load;
  # asking for faces says which extra to install.
  code = """
import sys
sys.modules['dlib'] = None
sys.modules['face_recognition_models'] = None
import dhr_jax, dhr_jax.faces, dhr_jax.pipeline, dhr_jax.segmentation
from dhr_jax.config_files import load_config
load_config('configs/demo.py')
try:
  dhr_jax.faces.load_models()
except dhr_jax.faces.FacesUnavailable as e:
  print('unavailable:', e)
"""
  out = subprocess.run([sys.executable, "-c", code], cwd=REPO,
                       capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr
  assert "unavailable:" in out.stdout and "faces" in out.stdout


# ------------------------------------------------------- the run's photo side


def test_prepare_writes_crops_and_records_and_fails_faceless_photos(
    models, tmp_path):
  from dhr_jax import io
  from dhr_jax import photos
  src = tmp_path / "src"
  src.mkdir()
  two = _two_face_photo()
  Image.fromarray(two).save(src / "two.png")
  Image.fromarray(np.full((100, 120, 3), 90, np.uint8)).save(src / "wall.png")
  out = tmp_path / "out"
  entries, failed = photos.prepare(io.list_images(str(src)), str(out), 64,
                                   models, "all")
  assert [n for n, _ in entries] == ["two/face0", "two/face1"]
  assert [f["name"] for f in failed] == ["wall"]
  assert "no face found" in failed[0]["reason"]
  direct = faces.align_faces(models, two, 64, "all")
  for (_, path), al in zip(entries, direct):
    np.testing.assert_array_equal(np.asarray(Image.open(path)), al.image)
  import json
  info = json.load(open(out / "two" / photos.FACES_FILE))
  assert (info["height"], info["width"]) == two.shape[:2]
  np.testing.assert_allclose(info["faces"][1]["quad"], direct[1].quad)
  entries, _ = photos.prepare(io.list_images(str(src)), str(out), 64, models,
                              "largest")
  assert [n for n, _ in entries] == ["two/face0"]


def test_paste_photo_from_written_outputs(models, tmp_path):
  from dhr_jax import io
  from dhr_jax import photos
  src = tmp_path / "two.png"
  two = _two_face_photo()
  Image.fromarray(two).save(src)
  entries, _ = photos.prepare([("two", str(src))], str(tmp_path), 256,
                              models, "all")
  # Stand-ins for finished faces: the inversion is the aligned crop itself,
  # the one edit is a grey square. Face 1 has no marker (not finished).
  d = tmp_path / "two" / "face0"
  crop = np.asarray(Image.open(entries[0][1]))
  files_lib.write_bytes(str(d / "inversion.png"), files_lib.png_bytes(crop))
  files_lib.write_bytes(str(d / "edits" / "grey.png"),
                        files_lib.png_bytes(np.full((256, 256, 3), 128, np.uint8)))
  files_lib.write_json(str(d / workdir_lib.MARKER), dict(
      fingerprint="x", edits=["grey"],
      files=["inversion.png", "edits/grey.png"]))
  written = photos.paste_photo(str(tmp_path), "two", str(src), stamp="x")
  assert sorted(written) == ["face0/pasted/edits/grey.png",
                             "face0/pasted/inversion.png", "pasted_all.png"]
  pasted = np.asarray(Image.open(d / "pasted" / "inversion.png"))
  l, t, r, b = ASTRONAUT_FACE
  assert pasted.shape == two.shape
  assert _psnr(pasted[t:b, l:r], two[t:b, l:r]) >= 35.0  # 37.2 dB measured
  # Only face 0 was finished: the right half of the photo is untouched.
  together = np.asarray(Image.open(tmp_path / "two" / "pasted_all.png"))
  np.testing.assert_array_equal(together, pasted)
  assert np.array_equal(together[:, 512:], two[:, 512:])
  grey = np.asarray(Image.open(d / "pasted" / "edits" / "grey.png"))
  assert np.all(grey[t:b, l:r] == 128)
  # Another fingerprint: nothing is pasted from stale outputs.
  assert photos.paste_photo(str(tmp_path), "two", str(src), stamp="y") == []


def test_parser_landmarks_and_identity_metrics(models, astronaut_aligned):
  from dhr_jax import photos
  _, al = astronaut_aligned
  x = al.image.astype(np.float32) / 127.5 - 1.0
  blank = np.zeros_like(x)
  lm, notes = photos.parser_landmarks(models, np.stack([x, blank]))
  np.testing.assert_array_equal(lm[0], faces.detect(models, al.image)[0].five)
  # A flat grey image has no face: an all-NaN row, DSS's "no face".
  assert np.isnan(lm[1]).all()
  assert notes == ["", photos.NO_FACE_NOTE]
  # Crops aligned from a detection hold a face: the template stands in.
  lm, notes = photos.parser_landmarks(models, np.stack([x, blank]),
                                      aligned_crops=True)
  np.testing.assert_array_equal(lm[0], faces.detect(models, al.image)[0].five)
  np.testing.assert_array_equal(lm[1], alignment.ffhq_landmarks(256))
  assert notes == ["", photos.TEMPLATE_NOTE]
  lm, notes = photos.parser_landmarks(None, np.stack([x, blank]))
  np.testing.assert_array_equal(lm, np.stack([alignment.ffhq_landmarks(256)]
                                             * 2).astype(np.float32))
  assert notes == [photos.NO_EXTRA_NOTE] * 2
  shifted = np.roll(x, 2, axis=(0, 1))
  m = photos.identity_metrics(models, x, x, {"shifted": shifted,
                                             "grey": blank})
  assert abs(m["id_dlib"] - 1.0) < 1e-6
  # Measured: 0.9969 for the aligned crop shifted by 2 px read from the
  # input's chip; a uniform grey image 0.845 (dlib's descriptors are not
  # centred: even unrelated pictures have cosine ≈ 0.8).
  assert m["id_dlib_shifted"] > 0.99
  assert m["id_dlib_grey"] < 0.9
  assert photos.identity_metrics(models, blank, x, {}) == {}


def test_parser_landmarks_take_the_top_scoring_face(models):
  # As the official code takes RetinaFace's top-scoring face: here the
  # larger face, blurred, scores lower than the smaller sharp one.
  from PIL import ImageFilter
  from dhr_jax import photos
  a = data.astronaut()
  square = np.zeros((896, 896, 3), np.uint8)
  square[:512, :512] = np.asarray(
      Image.fromarray(a).filter(ImageFilter.GaussianBlur(1.75)))
  square[64:448, 512:] = np.asarray(
      Image.fromarray(a[:, ::-1]).resize((384, 384), Image.LANCZOS))
  found = faces.detect(models, square)
  # Measured: the blurred astronaut (90 px box) scores 0.583, the mirrored
  # one (62 px) 0.857; both above MIN_SCORE (0.5).
  assert [f.box[0] > 512 for f in found] == [False, True]
  assert found[0].size > found[1].size and found[0].score < found[1].score
  lm, notes = photos.parser_landmarks(
      models, square[None].astype(np.float32) / 127.5 - 1.0)
  np.testing.assert_array_equal(lm[0], found[1].five)
  assert notes == [""]


# ------------------------------------------------------------ run.py, aligned


def _tiny_demo_config(inputs):
  c = load_config(os.path.join(REPO, "configs", "demo.py"))
  c.data.input = inputs
  c.data.align = True
  c.data.faces = "all"
  c.data.min_face_size = 32  # the mirrored face's box is 62 px
  # The 64² stand-in, narrower, and a handful of steps: mechanics only.
  c.update_from_flattened_dict({
      "model.stand_in.channels": 16, "embedding.n_mean_latent": 500,
      "dss.coarse_steps": 3, "dss.n_segments": 16, "refine.feature_steps": 4,
      "refine.weight_steps": 2, "save.intermediate": False})
  return c


@pytest.mark.slow  # compiles the whole (tiny) pipeline: ~2-3 min here
def test_run_aligns_inverts_and_pastes_every_face(tmp_path):
  from dhr_jax import runner
  inputs = tmp_path / "photos"
  inputs.mkdir()
  two = _two_face_photo()
  Image.fromarray(two).save(inputs / "two.png")
  Image.fromarray(data.coffee()).save(inputs / "coffee.png")  # no face
  workdir = tmp_path / "out"
  outcome = runner.run(_tiny_demo_config(str(inputs)), str(workdir))
  # The photo without a face is a failed input, not a crash.
  assert outcome.status == 1
  assert [f["name"] for f in outcome.failed] == ["coffee"]
  assert "no face found" in outcome.failed[0]["reason"]
  assert sorted(outcome.done) == ["two/face0", "two/face1"]
  for k in (0, 1):
    d = workdir / "two" / f"face{k}"
    for rel in ("inversion.png", "pasted/inversion.png",
                "pasted/edits/random_-2.png", "pasted/edits/random_2.png"):
      assert (d / rel).is_file(), rel
    assert np.asarray(Image.open(d / "pasted" / "inversion.png")).shape == (
        two.shape)
  together = np.asarray(Image.open(workdir / "two" / "pasted_all.png"))
  assert together.shape == two.shape
  # Both faces changed, the corners (far from both) are the photo's.
  for box in (ASTRONAUT_FACE, (695, 129, 757, 191)):
    l, t, r, b = box
    assert np.any(together[t:b, l:r] != two[t:b, l:r])
  for y, x in ((0, 0), (511, 0), (0, 895), (511, 895)):
    np.testing.assert_array_equal(together[y, x], two[y, x])
  header = open(workdir / "metrics.csv").readline().strip().split(",")
  assert {"id_dlib", "id_dlib_random_2"} <= set(header)
  # Re-editing finds the faces one level down and pastes the new edits
  # beside the run's, which it keeps.
  config = _tiny_demo_config(str(inputs))
  config.edit.strengths = "3"
  outcome = runner.edit(config, str(workdir))
  assert outcome.status == 0 and len(outcome.done) == 2
  pasted = sorted(os.listdir(workdir / "two" / "face1" / "pasted" / "edits"))
  assert pasted == ["random_-2.png", "random_2.png", "random_3.png"]


def test_align_without_the_extra_is_a_one_line_error(tmp_path):
  Image.fromarray(data.astronaut()).save(tmp_path / "a.png")
  code = f"""
import sys, runpy
sys.modules['dlib'] = None
sys.argv = ['run.py', '--config=configs/demo.py', '--workdir={tmp_path}/out',
            '--config.data.input={tmp_path}/a.png', '--config.data.align=True']
runpy.run_path('run.py', run_name='__main__')
"""
  out = subprocess.run([sys.executable, "-c", code], cwd=REPO,
                       capture_output=True, text=True, timeout=300)
  assert out.returncode == 2, out.stderr
  last = out.stderr.strip().splitlines()[-1]
  assert last.startswith("error: config.data.align=True") and "faces" in last
  assert "Traceback" not in out.stderr


def test_parser_frame_follows_each_images_own_landmarks(models,
                                                        astronaut_aligned):
  # The parser's face crop is placed by the landmarks DSS passes: with each
  # image's own (detected) landmarks, a face shifted by 20 px inside the
  # aligned square moves the parser's frame with it; the canonical template
  # would leave it where an FFHQ-aligned face would be.
  import jax.numpy as jnp
  from dhr_jax import photos
  from dhr_jax.models import farl
  _, al = astronaut_aligned
  x = al.image.astype(np.float32) / 127.5 - 1.0
  moved = np.roll(x, 20, axis=1)
  batch = np.stack([x, moved])
  lm, notes = photos.parser_landmarks(models, batch)
  assert notes == ["", ""]
  yy, xx = np.mgrid[:64, :64]
  # A "face" disc in the middle of the parser's frame.
  disc = ((yy - 31.5) ** 2 + (xx - 31.5) ** 2 < 15 ** 2).astype(np.float32)
  logits_fn = lambda crops: jnp.broadcast_to(
      jnp.asarray(disc)[None, ..., None], (crops.shape[0], 64, 64, 1))

  def centre_x(landmarks):
    maps = np.asarray(farl.parse_logits(logits_fn, jnp.asarray(batch),
                                        landmarks))[..., 0]
    cols = np.arange(256)
    return [float((m.sum(0) * cols).sum() / m.sum()) for m in maps]

  own = centre_x(jnp.asarray(lm))
  # Measured: the frame moves 20.1 px with the face (the detected nose and
  # eyes move by exactly the roll, up to the predictor's ±1 px).
  assert abs((own[1] - own[0]) - 20.0) < 2.0, own
  fixed = centre_x(None)
  assert abs(fixed[1] - fixed[0]) < 1e-3, fixed
