"""The browser editor (`python -m dhr_jax.app`) driven from headless Chromium.

The app runs as a real server (a subprocess with the demo config, on a free
local port); Selenium drives Debian's chromium through chromedriver
(`apt-get install chromium chromium-driver`; nothing downloads a browser).
"""
import io as std_io
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
import urllib.request
import zipfile

import numpy as np
import pytest
from PIL import Image
import skimage.data

pytest.importorskip("gradio", reason="the app extra: pip install -e .[app]")
webdriver = pytest.importorskip("selenium.webdriver")

from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.action_chains import ActionChains  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

import dhr_jax  # noqa: E402
from dhr_jax import app  # noqa: E402
from dhr_jax import config_files  # noqa: E402
from dhr_jax import editing  # noqa: E402
from dhr_jax import editor as editor_lib  # noqa: E402
from dhr_jax import edits as edits_lib  # noqa: E402
from dhr_jax import faces  # noqa: E402
from dhr_jax import files  # noqa: E402
from dhr_jax import io  # noqa: E402
from dhr_jax import loading  # noqa: E402
from dhr_jax import photos  # noqa: E402
from dhr_jax import workdir as workdir_lib  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO = os.path.join(ROOT, "configs", "demo.py")
CHROMIUM = shutil.which("chromium")
CHROMEDRIVER = shutil.which("chromedriver")
# The flags that work on a sandbox-less CI machine without network.
CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu",
                  "--disable-quic", "--no-first-run",
                  "--disable-background-networking",
                  "--disable-component-update", "--disable-sync",
                  "--window-size=1280,1500")
UPLOAD_LIMIT_MB = 2
# The demo's whole pipeline (compiles included) on a loaded 2-core machine
# took about 3 minutes; far more means something hangs.
RUN_TIMEOUT = 1200

pytestmark = pytest.mark.skipif(
    not (CHROMIUM and CHROMEDRIVER),
    reason="needs Debian's chromium and chromium-driver (apt-get install -y "
    "chromium chromium-driver; .ci/run installs them)")


def _demo_config():
  return config_files.load_config(DEMO)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
  """The app on a free port with the demo config → (url, workdir)."""
  workdir = str(tmp_path_factory.mktemp("app_workdir"))
  env = dict(os.environ, GRADIO_TEMP_DIR=str(tmp_path_factory.mktemp("gr")),
             GRADIO_ANALYTICS_ENABLED="False", PYTHONUNBUFFERED="1")
  log = open(os.path.join(workdir, "..", "app.log"), "w+")
  proc = subprocess.Popen(
      [sys.executable, "-m", "dhr_jax.app", f"--config={DEMO}",
       f"--workdir={workdir}", "--port=0",
       f"--max_upload_mb={UPLOAD_LIMIT_MB}"],
      cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=log, text=True)
  url = []

  def read():
    for line in proc.stdout:
      m = re.match(r"DHR editor: (http://\S+)", line)
      if m:
        url.append(m.group(1))
  reader = threading.Thread(target=read, daemon=True)
  reader.start()
  deadline = time.monotonic() + 600
  while not url and proc.poll() is None and time.monotonic() < deadline:
    time.sleep(0.5)
  if not url:
    proc.kill()
    log.seek(0)
    pytest.fail(f"the app did not start:\n{log.read()[-3000:]}")
  try:
    yield url[0], workdir
  finally:
    proc.terminate()
    try:
      proc.wait(30)
    except subprocess.TimeoutExpired:
      proc.kill()
    log.close()


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
  downloads = str(tmp_path_factory.mktemp("downloads"))
  options = webdriver.ChromeOptions()
  options.binary_location = CHROMIUM
  for flag in CHROMIUM_FLAGS:
    options.add_argument(flag)
  options.add_argument("--user-data-dir="
                       + str(tmp_path_factory.mktemp("chromium_profile")))
  options.add_experimental_option("prefs", {
      "download.default_directory": downloads,
      "download.prompt_for_download": False})
  driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
  driver.downloads = downloads
  try:
    yield driver
  finally:
    driver.quit()


def _status(driver):
  return driver.find_element(By.ID, "status").text


def _upload(driver, url, path, expect, timeout=RUN_TIMEOUT, seen=None):
  """Loads the page, uploads `path`, waits for a status matching `expect`.

  seen: optional {pattern: []}; each list collects the page texts matching
  its pattern while the page works (the progress bars)."""
  driver.get(url)
  wait = WebDriverWait(driver, 120)
  field = wait.until(lambda d: d.find_element(
      By.CSS_SELECTOR, "#photo input[type=file]"))
  field.send_keys(path)

  def done(d):
    if seen:
      body = d.find_element(By.TAG_NAME, "body").text
      for pattern, found in seen.items():
        found += re.findall(pattern, body)
    return re.search(expect, _status(d))
  WebDriverWait(driver, timeout, poll_frequency=1).until(done)
  return _status(driver)


def _image_src(driver, elem_id):
  found = driver.find_elements(By.CSS_SELECTOR, f"#{elem_id} img")
  return found[0].get_attribute("src") if found else None


def _fetch_png(src):
  with urllib.request.urlopen(src) as r:
    return np.asarray(Image.open(std_io.BytesIO(r.read())).convert("RGB"))


def _download(driver, elem_id, name):
  """Clicks a download button and returns the downloaded file's path."""
  target = os.path.join(driver.downloads, name)
  if os.path.exists(target):
    os.remove(target)
  driver.find_element(By.ID, elem_id).click()
  WebDriverWait(driver, 60).until(
      lambda d: os.path.isfile(target) and not os.path.exists(
          target + ".crdownload"))
  return target


def _png(path):
  with Image.open(path) as im:
    return np.asarray(im.convert("RGB"))


def _assert_rounds(u8, image):
  """u8 is `io.to_uint8` of a render equal to `image` up to float round-off.

  Two renders of the same codes by the app differed in 1 of 12288 uint8
  values, by 1 (measured in this test: a float difference far below one
  level, at a .5 rounding boundary), so each value must be within half a
  level of this render's, plus 0.05 levels (2e-4 in [-1, 1] units, ~1000
  float32 ulps at 1.0; one edit step of the slider moves pixels by levels).
  """
  exact = np.clip((np.asarray(image, np.float64) + 1.0) * 127.5, 0, 255)
  assert np.abs(u8.astype(np.float64) - exact).max() <= 0.55


# --------------------------------------------------------------------------
# The Editor and the page's components, without a server: a photo with two
# faces whose refinements are made here (one step each), as a run leaves
# them.


@pytest.fixture(scope="module")
def two_faces(tmp_path_factory):
  """An Editor (the demo's stand-in at 32²) over a workdir holding the two
  finished faces of a photo → (editor, photo, {label: directory})."""
  pytest.importorskip("dlib")
  import jax
  from dhr_jax import refine
  from tests.test_faces import _two_face_photo
  config = _demo_config()
  config.update_from_flattened_dict({
      "model.stand_in.size": 32, "model.stand_in.style_dim": 32,
      "model.stand_in.n_mlp": 1, "model.stand_in.channels": 16,
      "embedding.n_mean_latent": 100, "data.min_face_size": 32})
  workdir = tmp_path_factory.mktemp("two_faces")
  editor = app.Editor(config, str(workdir))
  assert editor.align and editor.config.data.faces == "all"
  photo = _two_face_photo()
  src = workdir / "two.png"
  Image.fromarray(photo).save(src)
  entries, failed = photos.prepare(
      [("two", str(src))], str(workdir), 32, photos.face_models(), "all",
      min_size=32)
  assert [n for n, _ in entries] == ["two/face0", "two/face1"] and not failed
  G = editor.G
  crops = np.stack([io.load_image(p, 32) for _, p in entries])
  # Each face's own code (two random ones: the faces' renders differ).
  codes = np.asarray(jax.random.normal(jax.random.PRNGKey(0), (2, 32)))
  codes = np.asarray(G.mapping(G.params, codes))[:, None].repeat(
      G.n_latent, 1)
  r = refine.hybrid_refine(G, codes, crops, np.ones((2, 32, 32, 1),
                                                     np.float32),
                           feature_idx=3, feature_steps=1, weight_steps=0,
                           lpips_lambda=0.0)
  dirs = {}
  for k, (name, _) in enumerate(entries):
    d = os.path.join(str(workdir), name)
    refine.save_refined(os.path.join(d, "refined"), r, G, index=k)
    for f, image in (("input.png", crops[k]), ("inversion.png", r.image[k]),
                     ("mask.png", np.ones((32, 32, 3)))):
      files.write_bytes(os.path.join(d, f),
                        files.png_bytes(io.to_uint8(image)))
    files.write_json(os.path.join(d, workdir_lib.MARKER), dict(
        name=name, fingerprint="test",
        files=["input.png", "inversion.png", "mask.png"]))
    dirs[name] = d
  return editor, photo, dirs


def test_editor_edits_the_face_picked(two_faces):
  editor, photo, dirs = two_faces
  assert editor.faces_of("two") == ["two/face0", "two/face1"]
  assert editor.faces_of(os.path.join("two", "face1")) == list(dirs)
  alpha = 1.5
  assert [s.name for s in editor.sliders] == ["random"]
  n = edits_lib.random_direction(0, editor.G.config["style_dim"])
  edits = {}
  for label, d in dirs.items():
    loaded = editor.load(label)
    edit, pasted, written = editor.edit(loaded, [alpha], *editor.layers)
    assert written["edit"] == os.path.join(d, editor_lib.APP_DIR, "edit.png")
    # The picked face's own refinement, moved along the direction.
    refined = dhr_jax.load_refined(os.path.join(d, "refined"), editor.G)
    want = dhr_jax.render(editor.G, refined, editing.edit_codes(
        refined.codes, n, [alpha])[:, 0])[0]
    _assert_rounds(edit, np.asarray(want))
    edits[label] = edit
    # Pasted where that face is: the astronaut on the left (x < 512), her
    # mirrored copy on the right; the other half is the photo's.
    changed = np.any(pasted != photo, axis=(0, 2))
    if label.endswith("face0"):
      assert changed[:512].any() and not changed[512:].any()
    else:
      assert changed[512:].any() and not changed[:512].any()
  assert not np.array_equal(edits["two/face0"], edits["two/face1"])

  # All faces at once: each face's edit, side by side, all pasted in.
  loaded = [editor.load(label) for label in dirs]
  strip, pasted, written = editor.edit_faces(loaded, [alpha], *editor.layers)
  np.testing.assert_array_equal(strip,
                                editor_lib.side_by_side(list(edits.values())))
  assert strip.shape == (32, 2 * 32 + 4, 3)
  changed = np.any(pasted != photo, axis=(0, 2))
  assert changed[:512].any() and changed[512:].any()
  top = os.path.dirname(dirs["two/face0"])
  assert written["pasted"] == os.path.join(top, editor_lib.APP_DIR,
                                          "pasted.png")
  with zipfile.ZipFile(written["refined"]) as z:
    tops = {tuple(n.split("/")[:2]) for n in z.namelist()}
  assert tops == {("face0", "refined"), ("face1", "refined")}


def test_page_lists_the_faces_and_draws_previews_large(two_faces):
  editor, _, dirs = two_faces
  page = app.build_ui(editor)
  by_id = {b.elem_id: b for b in page.blocks.values()
           if getattr(b, "elem_id", None)}
  for elem_id in ("input", "inversion", "mask", "edit"):
    assert by_id[elem_id].height >= 256, elem_id
    # Gradio draws an image at most at its own size unless told otherwise.
    assert f"#{elem_id} img {{ object-fit: contain;" in app.PAGE_CSS
  # The Face picker's handler: picking a face shows it, 'all faces' both.
  face = by_id["face"]
  handler = next(f.fn for f in page.fns.values()
                 if [b._id for b in f.inputs][:1] == [face._id])
  first = editor.load("two/face0")
  out = handler("two/face1", first)
  inp, picker = out[0], out[11]
  np.testing.assert_array_equal(inp, _png(os.path.join(dirs["two/face1"],
                                                       "input.png")))
  assert picker["visible"] and picker["value"] == "two/face1"
  assert [c[1] for c in picker["choices"]] == [*dirs, app.ALL_FACES]
  out = handler(app.ALL_FACES, first)
  assert out[0].shape == (32, 2 * 32 + 4, 3)
  assert isinstance(out[6], list) and len(out[6]) == 2
  assert "all 2 faces" in out[5]


# edit.method='diffcam': the Editor and the page's handlers on the stand-ins
# of test_diffcam_run (conftest.py's diffcam_stand_ins, made once a
# session), over a finished image as a diffcam run leaves it.


# The stand-ins (~2 min, shared with test_diffcam_run) and the compiles of
# pSp, the generator, DiffCam with its gradient and the deghosting network.
@pytest.mark.slow
def test_editor_slides_a_diffcam_direction(diffcam_stand_ins, tmp_path,
                                           monkeypatch):
  import test_diffcam_run
  from dhr_jax import differential
  from dhr_jax.models import diffcam
  si = diffcam_stand_ins
  workdir = tmp_path / "out"
  editor = app.Editor(test_diffcam_run._config(si), str(workdir))
  smiling = diffcam.direction_class("Smiling")
  # One slider per direction, α from config.edit.alpha (the published 20).
  assert [(s.name, s.kind, s.value, s.limit, s.target)
          for s in editor.sliders] == [
              ("Smiling", "diffcam", 20.0, 30.0, smiling),
              ("mine", "diffcam", 20.0, 30.0, 3)]
  # A finished image as a diffcam run leaves it (no refined/, no mask).
  d = str(workdir / "p0")
  x = io.load_image(str(si / "inputs" / "p0.png"), 32)
  for f in ("input.png", "inversion.png"):
    files.write_bytes(os.path.join(d, f), files.png_bytes(io.to_uint8(x)))
  files.write_json(os.path.join(d, workdir_lib.MARKER), dict(
      name="p0", fingerprint="test", files=["input.png", "inversion.png"]))
  inverted = []
  invert = differential.invert
  monkeypatch.setattr(differential, "invert",
                      lambda *a: inverted.append(1) or invert(*a))

  page = app.build_ui(editor)
  by_id = {b.elem_id: b for b in page.blocks.values()
           if getattr(b, "elem_id", None)}
  assert by_id["mask"].label == app.HEAT_MAP_LABEL
  handler = lambda block, n: next(
      f.fn for f in page.fns.values()
      if [b._id for b in f.inputs][-1:] == [block._id] and
      len(f.inputs) == n)

  def want(direction, target, alpha):
    """The method's one-call API on the image the page edits."""
    de = dhr_jax.differential_edit(
        editor.models.encoder, editor.G, editor.models.diffcam,
        editor.models.deghosting, x[None], direction, target, alpha)
    return (io.to_uint8(np.asarray(de.deghosted[0])),
            io.mask_to_uint8(np.asarray(de.heat_map[0])))

  # Picking the image embeds it and shows the first direction at α = 20.
  out = handler(by_id["pick"], 1)("p0")
  assert "Loaded **p0**" in out[5], out[5]
  assert "Showing Smiling at α = 20" in out[5], out[5]
  loaded, values = out[6], [u["value"] for u in out[12:]]
  assert values == [20.0, 20.0]
  edit, heat = want(np.load(si / "smile.npy"), smiling, 20.0)
  np.testing.assert_array_equal(out[3], edit)
  np.testing.assert_array_equal(out[2], heat)
  # Moving the second slider redoes that direction's edit only, from the
  # kept inversion (pSp is not run again).
  out = handler(by_id["slider_1"], 2)(loaded, -10.0)
  edit, heat = want(np.load(si / "mine.npy"), 3, -10.0)
  np.testing.assert_array_equal(out[0], edit)
  np.testing.assert_array_equal(out[1], heat)
  assert "mine α = -10" in out[3], out[3]
  assert inverted == [1]
  written = json.loads((workdir / "p0" / editor_lib.APP_DIR /
                        "edit.json").read_text())
  assert written == dict(image="p0", direction="mine", diffcam_class=3,
                         alpha=-10.0, empty_heat_map=bool(heat.max() == 0))
  np.testing.assert_array_equal(
      _png(out[4]["value"]), edit)  # the Edit download
  np.testing.assert_array_equal(files.read_png(os.path.join(
      d, editor_lib.APP_DIR, "heat_map.png"))[..., 0], heat)


def test_error_paths_are_messages_on_the_page(server, browser, tmp_path):
  url, workdir = server
  text = tmp_path / "notes.txt"
  text.write_text("not a photo\n")
  status = _upload(browser, url, str(text), r"Refined|error")
  assert "notes.txt is not an image" in status
  assert "Traceback" not in browser.page_source

  # A file over --max_upload_mb is refused before it is read.
  big = tmp_path / "big.png"
  big.write_bytes(os.urandom(int((UPLOAD_LIMIT_MB + 0.5) * 2**20)))
  browser.get(url)
  field = WebDriverWait(browser, 120).until(lambda d: d.find_element(
      By.CSS_SELECTOR, "#photo input[type=file]"))
  field.send_keys(str(big))
  WebDriverWait(browser, 60).until(
      lambda d: re.search(r"exceed the maximum allowed size", d.find_element(
          By.TAG_NAME, "body").text))
  assert "Traceback" not in browser.page_source

  if photos.face_models() is None:
    pytest.skip("no-face check needs the faces extra (alignment is off)")
  coffee = tmp_path / "coffee.png"
  Image.fromarray(skimage.data.coffee()).save(coffee)
  status = _upload(browser, url, str(coffee), r"Refined|error")
  assert "no face found" in status
  # A refused photo is not left among the run's inputs.
  assert not os.path.exists(os.path.join(workdir, "inputs", "coffee.png"))
  assert "Traceback" not in browser.page_source


@pytest.mark.slow
def test_upload_refine_slide_download(server, browser, tmp_path):
  url, workdir = server
  photo = tmp_path / "astronaut.png"
  Image.fromarray(skimage.data.astronaut()).save(photo)
  steps = r"(\d+)/(\d+) steps"
  seen = {steps: [], r"segmentation|embedding": [], r"refinement": []}
  status = _upload(browser, url, str(photo), r"Refined|error", seen=seen)
  assert status.startswith("Refined"), status
  # The progress bar named the stages and counted the steps of the coarse
  # inversion and of the refinement (the demo's dss.coarse_steps and
  # refine.feature_steps).
  assert seen[r"segmentation|embedding"] and seen[r"refinement"]
  demo = _demo_config()
  assert seen[steps] and {int(n) for _, n in seen[steps]} == {
      demo.dss.coarse_steps, demo.refine.feature_steps}
  assert len({k for k, _ in seen[steps]}) > 1

  # Page: input, inversion, the labelled mask and the edit at α = 0, each
  # drawn at a readable size: the 64² images fill their frame (object-fit
  # contain; Gradio's own scale-down drew them at 64 px), 286 × 318 px
  # each in the 1280 px wide window (measured), so a square image ≥ 256².
  for elem_id in ("input", "inversion", "mask", "edit"):
    assert _image_src(browser, elem_id), elem_id
    img = browser.find_element(By.CSS_SELECTOR, f"#{elem_id} img")
    fit = browser.execute_script(
        "return getComputedStyle(arguments[0]).objectFit", img)
    assert fit == "contain", (elem_id, fit)
    assert min(img.size["height"], img.size["width"]) >= 256, (elem_id,
                                                               img.size)
  assert app.MASK_LABEL in browser.page_source
  before_src = _image_src(browser, "edit")
  before = _fetch_png(before_src)

  slider = browser.find_element(By.CSS_SELECTOR, "#slider_0 input[type=range]")
  ActionChains(browser).click_and_hold(slider).move_by_offset(
      slider.size["width"] // 4, 0).release().perform()
  WebDriverWait(browser, 600, poll_frequency=0.5).until(
      lambda d: _status(d).startswith("Edited")
      and _image_src(d, "edit") != before_src)
  alpha = float(slider.get_attribute("value"))
  assert alpha != 0
  assert f"random {alpha:g}" in _status(browser)

  shown = _fetch_png(_image_src(browser, "edit"))
  edit = _png(_download(browser, "download_edit", "edit.png"))

  # What dhr_jax renders for the same code and strength, from the saved
  # refinement.
  labels = list(app.finished(workdir))
  assert len(labels) == 1, labels
  directory = os.path.join(workdir, labels[0])
  G = loading.load_generator(_demo_config())
  refined = dhr_jax.load_refined(os.path.join(directory, "refined"), G)
  n = edits_lib.random_direction(0, G.config["style_dim"])
  codes = editing.edit_codes(refined.codes, n, [alpha])[:, 0]
  want = np.asarray(dhr_jax.render(G, refined, codes)[0])
  # The page's image and the PNG are the uint8 rounding of that render.
  _assert_rounds(shown, want)
  _assert_rounds(edit, want)
  # The edit moved the image (the demo's random direction at |α| ≥ 0.5
  # changes most pixels of the 64² stand-in).
  assert np.abs(edit.astype(int) - before).mean() > 1.0
  # α = 0 is the inversion.
  _assert_rounds(before, np.asarray(dhr_jax.render(G, refined)[0]))
  _assert_rounds(_png(os.path.join(directory, "inversion.png")),
                 np.asarray(dhr_jax.render(G, refined)[0]))

  # The refined/ zip holds what --mode=edit and load_refined read.
  zipped = _download(browser, "download_refined", "refined.zip")
  unpacked = tmp_path / "unzipped"
  with zipfile.ZipFile(zipped) as z:
    z.extractall(unpacked)
  again = dhr_jax.load_refined(str(unpacked / "refined"), G)
  _assert_rounds(io.to_uint8(dhr_jax.render(G, again, codes)[0]), want)

  if photos.face_models() is not None:
    # Aligned: OUT/astronaut/face0, and the edit pasted into the photo.
    assert labels[0] == os.path.join("astronaut", "face0")
    pasted = _png(_download(browser, "download_pasted", "pasted.png"))
    with open(os.path.join(workdir, "astronaut", photos.FACES_FILE)) as f:
      quad = np.asarray(json.load(f)["faces"][0]["quad"])
    np.testing.assert_array_equal(
        pasted, faces.paste(skimage.data.astronaut(), edit, quad)[0])

  shot = os.environ.get("DHR_APP_SCREENSHOT")
  if shot:
    png = browser.get_screenshot_as_png()
    Image.open(std_io.BytesIO(png)).convert("RGB").quantize(128).save(
        shot, optimize=True)
