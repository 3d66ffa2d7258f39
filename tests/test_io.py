"""Image loading (modes, crops, resize, bad files) and atomic writes."""
import os

import numpy as np
import pytest
from PIL import Image

from dhr_jax import files as files_lib
from dhr_jax import io
from dhr_jax import pictures


def _save(path, array, mode=None, **kw):
  Image.fromarray(array, mode).save(path, **kw)
  return str(path)


def test_list_images_sorted_filtered_and_disambiguated(tmp_path):
  rgb = np.zeros((4, 4, 3), np.uint8)
  for f in ("b.png", "a.JPG", "c.webp", "a.png", "d.jpeg"):
    _save(tmp_path / f, rgb)
  (tmp_path / "notes.txt").write_text("not an image")
  (tmp_path / "sub.png").mkdir()  # a folder with an image name is skipped
  got = io.list_images(tmp_path)
  assert [n for n, _ in got] == ["a_jpg", "a_png", "b", "c", "d"]
  assert [os.path.basename(p) for _, p in got] == [
      "a.JPG", "a.png", "b.png", "c.webp", "d.jpeg"]
  single = io.list_images(tmp_path / "c.webp")
  assert single == [("c", str(tmp_path / "c.webp"))]


def test_list_images_errors(tmp_path):
  with pytest.raises(io.ImageError, match="no such file or folder"):
    io.list_images(tmp_path / "missing")
  (tmp_path / "x.txt").write_text("")
  with pytest.raises(io.ImageError, match="no images"):
    io.list_images(tmp_path)
  with pytest.raises(io.ImageError, match="data.input"):
    io.list_images("")


def test_rgb_identity_and_range(tmp_path):
  rng = np.random.default_rng(0)
  a = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
  x = io.load_image(_save(tmp_path / "a.png", a), 8)
  assert x.dtype == np.float32 and x.shape == (8, 8, 3)
  np.testing.assert_array_equal(io.to_uint8(x), a)
  assert x.min() >= -1.0 and x.max() <= 1.0


def test_grayscale_becomes_three_equal_channels(tmp_path):
  g = np.arange(64, dtype=np.uint8).reshape(8, 8) * 4
  x = io.load_image(_save(tmp_path / "g.png", g, "L"), 8)
  u = io.to_uint8(x)
  for c in range(3):
    np.testing.assert_array_equal(u[..., c], g)


def test_sixteen_bit_grayscale_is_scaled(tmp_path):
  g = (np.arange(16, dtype=np.uint16).reshape(4, 4) * 4369)  # 0..65535
  path = tmp_path / "g16.png"
  Image.fromarray(g).save(path)
  assert Image.open(path).mode.startswith("I")
  u = io.to_uint8(io.load_image(path, 4))
  np.testing.assert_array_equal(u[..., 0], (g // 257).astype(np.uint8))


def test_rgba_is_composited_onto_white(tmp_path):
  a = np.zeros((4, 4, 4), np.uint8)
  a[..., 0] = 200         # red
  a[..., 3] = 0           # fully transparent → white
  a[:2, :, 3] = 255       # top half opaque → the colour itself
  a[2, :, 3] = 128        # half: 200·α + 255·(1 − α)
  u = io.to_uint8(io.load_image(_save(tmp_path / "a.png", a, "RGBA"), 4))
  np.testing.assert_array_equal(u[0, 0], [200, 0, 0])
  np.testing.assert_array_equal(u[3, 0], [255, 255, 255])
  want = np.round(np.array([200, 0, 0]) * 128 / 255 + 255 * 127 / 255)
  # PIL blends in 8-bit integer arithmetic with its own rounding: 1 level.
  np.testing.assert_allclose(u[2, 0], want, atol=1)


def test_palette_image(tmp_path):
  a = np.zeros((4, 4, 3), np.uint8)
  a[:, 2:] = [10, 200, 30]
  path = tmp_path / "p.png"
  Image.fromarray(a).convert("P", palette=Image.ADAPTIVE, colors=4).save(path)
  np.testing.assert_array_equal(io.to_uint8(io.load_image(path, 4)), a)


def test_non_square_is_centre_cropped(tmp_path):
  # 4 rows x 8 columns: columns 2..5 are the centre square.
  a = np.zeros((4, 8, 3), np.uint8)
  a[:, :, 0] = np.arange(8, dtype=np.uint8)[None] * 30
  u = io.to_uint8(io.load_image(_save(tmp_path / "w.png", a), 4))
  np.testing.assert_array_equal(u[0, :, 0], [60, 90, 120, 150])
  tall = np.transpose(a, (1, 0, 2)).copy()
  u = io.to_uint8(io.load_image(_save(tmp_path / "t.png", tall), 4))
  np.testing.assert_array_equal(u[:, 0, 0], [60, 90, 120, 150])


def test_resize_is_lanczos(tmp_path):
  rng = np.random.default_rng(1)
  a = rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)
  x = io.load_image(_save(tmp_path / "a.png", a), 8)
  want = np.asarray(Image.fromarray(a).resize((8, 8), Image.LANCZOS))
  np.testing.assert_array_equal(io.to_uint8(x), want)


def test_jpeg_and_webp_load(tmp_path):
  a = np.full((8, 8, 3), 128, np.uint8)
  for f in ("a.jpg", "a.webp"):
    u = io.to_uint8(io.load_image(_save(tmp_path / f, a), 8))
    assert np.abs(u.astype(int) - 128).max() <= 2


def test_bad_files_name_the_file(tmp_path):
  junk = tmp_path / "junk.png"
  junk.write_bytes(b"this is not a png at all")
  with pytest.raises(io.ImageError, match=r"junk\.png.*not an image"):
    io.load_image(junk, 8)
  good = _save(tmp_path / "t.png", np.zeros((32, 32, 3), np.uint8))
  data = open(good, "rb").read()
  trunc = tmp_path / "trunc.png"
  trunc.write_bytes(data[:len(data) // 2])
  with pytest.raises(io.ImageError, match=r"trunc\.png"):
    io.load_image(trunc, 8)
  empty = tmp_path / "empty.jpg"
  empty.write_bytes(b"")
  with pytest.raises(io.ImageError, match=r"empty\.jpg"):
    io.load_image(empty, 8)


def test_atomic_write_replaces_and_leaves_no_temp(tmp_path):
  p = tmp_path / "sub" / "x.png"
  a = np.arange(12, dtype=np.uint8).reshape(2, 2, 3)
  files_lib.save_png(p, a)
  np.testing.assert_array_equal(np.asarray(Image.open(p)), a)
  files_lib.save_png(p, a[..., 0])
  np.testing.assert_array_equal(np.asarray(Image.open(p)), a[..., 0])
  assert sorted(os.listdir(p.parent)) == ["x.png"]
  assert os.stat(p).st_mode & 0o044  # readable by others, not mkstemp's 0600
  # PNG bytes are a pure function of the pixels (resume compares bytes).
  assert files_lib.png_bytes(a) == files_lib.png_bytes(a.copy())
  files_lib.write_json(tmp_path / "j.json", {"a": np.float32(1.5), "b": (1, 2)})
  assert (tmp_path / "j.json").read_text() == (
      '{\n  "a": 1.5,\n  "b": [\n    1,\n    2\n  ]\n}\n')


def test_failed_write_keeps_the_old_file(tmp_path, monkeypatch):
  p = tmp_path / "x.txt"
  files_lib.write_text(p, "old")

  def boom(src, dst):
    raise OSError("disk full")
  monkeypatch.setattr(os, "replace", boom)
  with pytest.raises(OSError, match="disk full"):
    files_lib.write_text(p, "new")
  assert p.read_text() == "old"
  assert sorted(os.listdir(tmp_path)) == ["x.txt"]


def test_check_writable(tmp_path):
  assert files_lib.check_writable(tmp_path / "new" / "dir") == str(
      tmp_path / "new" / "dir")
  blocker = tmp_path / "file"
  blocker.write_text("")
  with pytest.raises(files_lib.WorkdirError, match="not writable"):
    files_lib.check_writable(blocker / "out")


def test_grid_and_mask():
  a = np.zeros((4, 4, 3), np.uint8)
  m = io.mask_to_uint8(np.array([[[0.0], [1.0]], [[0.5], [0.25]]]))
  np.testing.assert_array_equal(m, [[0, 255], [128, 64]])
  g = pictures.grid([a, np.full((4, 4), 7, np.uint8), a], pad=1)
  assert g.shape == (4, 14, 3)
  np.testing.assert_array_equal(g[:, 4], 255)
  np.testing.assert_array_equal(g[:, 5:9], 7)


def test_superpixel_picture_fills_mean_colours():
  img = np.zeros((4, 4, 3), np.uint8)
  img[:, :2] = [10, 20, 30]
  img[:, 2:] = [100, 0, 0]
  img[0, 0] = [30, 40, 50]
  labels = np.array([[1, 1, 2, 2]] * 4)
  pic = pictures.superpixel_picture(img, labels)
  np.testing.assert_array_equal(pic[1, 0], [13, 23, 33])  # (7·10 + 30)/8 rounded
  np.testing.assert_array_equal(pic[3, 3], [100, 0, 0])
  big = np.zeros((256, 256, 3), np.uint8)
  lab = np.ones((256, 256), int)
  bnd = np.zeros((256, 256), bool)
  bnd[5, 5] = True
  pic = pictures.superpixel_picture(big, lab, bnd)
  np.testing.assert_array_equal(pic[5, 5], [255, 255, 0])
  assert pic[5, 6].sum() == 0
  assert pictures.superpixel_picture(img, labels, np.ones((4, 4), bool))[0, 0, 2] != 0


def test_error_and_parsing_pictures():
  e = np.array([[0.0, 1.0], [2.0, 4.0]])
  np.testing.assert_array_equal(pictures.error_picture(e), [[0, 64], [128, 255]])
  probs = np.zeros((1, 2, 19))
  probs[0, 0, 2] = 1.0   # face
  probs[0, 1, 0] = 1.0   # background
  pic = pictures.parsing_picture(probs)
  np.testing.assert_array_equal(pic[0, 0], pictures.PARSING_PALETTE[2])
  np.testing.assert_array_equal(pic[0, 1], [0, 0, 0])
  assert len({tuple(c) for c in pictures.PARSING_PALETTE}) == 19
