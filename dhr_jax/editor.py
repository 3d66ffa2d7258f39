"""The browser editor's session: the state and workdir logic behind the page
(`dhr_jax.app` draws it).

An `Editor` holds the run config, the models (loaded once for every
upload), the sliders (`edits.sliders`, a view of the CLI's edits) and the
workdir: uploads become the run's inputs in OUT/inputs/, `Editor.invert`
runs DHR on them exactly as run.py would (`runner.run`), and `Editor.edit`
renders the sliders' edit of a finished image into OUT/<name>/app/. With
the faces extra every face of a photo is refined (run.py's
data.faces='all'); `Editor.faces_of` lists them and `Editor.edit_faces`
edits several together (OUT/<photo>/app/: the edits side by side, the
photo with all of them pasted, every face's refined/).

With edit.method='diffcam' (editing via differential activations,
`dhr_jax.differential`) the run makes no refinement: `Editor.load` embeds
the image with pSp once (`differential.invert`), and each slider is one
direction's α: `Editor.slide` redoes only that direction's edit of the
kept inversion (the edited codes, their render, DiffCam's heat map, the
blend, the deghosting) and writes OUT/<name>/app/ (edit.png, heat_map.png,
pasted.png, edit.json).
"""
import dataclasses
import os
import threading
import zipfile

from absl import logging
import ml_collections
import numpy as np
from PIL import Image

from dhr_jax import checkpoint
from dhr_jax import differential
from dhr_jax import editing
from dhr_jax import edits
from dhr_jax import faces
from dhr_jax import files as dhr_files
from dhr_jax import io
from dhr_jax import loading
from dhr_jax import photos
from dhr_jax import pictures
from dhr_jax import refine
from dhr_jax import runner
from dhr_jax import settings
from dhr_jax import workdir as workdir_lib

INPUTS = "inputs"        # OUT/inputs: the uploads, the run's data.input
APP_DIR = "app"          # OUT/<name>/app: the current edit and downloads
# White columns between the faces of a photo edited together.
FACES_GAP = 4


class AppError(Exception):
  """Bad input from the page: shown to the user as one message."""


def finished(workdir):
  """{label: image folder} of every finished image of the workdir (run.py's
  OUT/<name>/ or OUT/<photo>/face<k>/), sorted."""
  return {os.path.relpath(d, workdir): d
          for _, d, _ in workdir_lib.finished(workdir)}


def side_by_side(images):
  """uint8 images (H, W, 3) of one height in a row, FACES_GAP white columns
  apart (the faces of a photo edited together)."""
  return pictures.grid(images, pad=FACES_GAP)


@dataclasses.dataclass
class Loaded:
  """A finished image as the page edits it: DHR's refinement, or with
  edit.method='diffcam' pSp's `differential.Inversion` of its input."""
  label: str
  directory: str
  refined: object
  photo: object = None
  quad: object = None
  inversion: object = None


class Editor:
  """The state behind the page: config, generator, sliders, workdir."""

  def __init__(self, config, workdir, max_upload_mb=25, max_pixels=50e6):
    settings.validate_config(config)
    self.method = settings.edit_method(config)
    self.workdir = os.path.abspath(workdir)
    self.inputs = os.path.join(self.workdir, INPUTS)
    self.config = ml_collections.ConfigDict(config.to_dict())
    self.config.data.input = self.inputs
    # With the faces extra every upload is treated as a raw photo, and
    # every face of it is refined (run.py's data.faces='all'): the page
    # lists them and edits the one picked, or all together.
    self.align = photos.face_models() is not None
    self.config.data.align = self.align
    if self.align:
      self.config.data.faces = "all"
    self.max_upload_mb = float(max_upload_mb)
    self.max_pixels = float(max_pixels)
    self.models = loading.load_models(self.config, loading.make_mesh())
    self.G = self.models.G
    # The CLI's edits (bad ones are refused now), as sliders.
    C = self.models.diffcam
    self.sliders = edits.sliders(edits.from_config(
        config.edit, self.G,
        num_classes=None if C is None else C.num_classes))
    self.n_latent = self.G.n_latent
    first_last = edits.parse_layers(config.edit.layers)
    self.layers = (first_last if isinstance(first_last, tuple)
                   else (0, self.n_latent))
    # One run at a time: `loop.prepare` holds the workdir's lock while a
    # run writes.
    self._lock = threading.Lock()

  # -- inputs --------------------------------------------------------------

  def add_upload(self, path):
    """Checks an uploaded file and stores it as OUT/inputs/<name>.png →
    the name. Raises AppError for anything that is not a usable image."""
    if not path or not os.path.isfile(path):
      raise AppError("no file received; upload a photo (png, jpg, webp)")
    base = os.path.basename(path)
    mb = os.path.getsize(path) / 2**20
    if mb > self.max_upload_mb:
      raise AppError(f"{base} is {mb:.1f} MB; the limit is "
                     f"{self.max_upload_mb:g} MB (--max_upload_mb)")
    try:
      with Image.open(path) as im:
        pixels = im.size[0] * im.size[1]
    except Exception:  # whatever PIL raises for a file that is no image
      pixels = 0
    if pixels > self.max_pixels:
      raise AppError(f"{base} has {pixels / 1e6:.0f} megapixels; the limit is "
                     f"{self.max_pixels / 1e6:g} (--max_megapixels)")
    try:
      photo = io.load_photo(path)
    except io.ImageError as e:
      raise AppError(f"{base} is not an image this app can read: "
                     f"{str(e).replace(path + ': ', '')}") from None
    stem = "".join(ch if ch.isalnum() or ch in "-_" else "_"
                   for ch in os.path.splitext(base)[0])[:60] or "photo"
    data = dhr_files.png_bytes(photo)
    name, k = stem, 1
    # A different photo under a taken name gets a new one; the same photo
    # again finds its finished outputs.
    while True:
      target = os.path.join(self.inputs, name + ".png")
      if not os.path.exists(target) or open(target, "rb").read() == data:
        break
      k += 1
      name = f"{stem}_{k}"
    if not os.path.exists(target):
      dhr_files.write_bytes(target, data)
    return name

  def invert(self, name, report):
    """Runs config.edit.method on the workdir's inputs (finished ones are
    skipped) → the Loaded result of input `name`."""
    with self._lock:
      try:
        outcome = runner.run(self.config, self.workdir, models=self.models,
                             progress=report)
      except settings.UserError as e:
        raise AppError(str(e)) from None
    # The photo itself (no face) or one of its faces (OUT/<photo>/face<k>).
    failed = [f for f in outcome.failed
              if f["name"] == name or f["name"].startswith(name + "/")]
    labels = self.faces_of(workdir_lib.output_name(name))
    if failed and (not labels or any(f["name"] == name for f in failed)):
      # A bad upload is not kept as an input: a resumed run would fail on
      # it. A photo with some faces finished stays, for those faces.
      os.remove(os.path.join(self.inputs, name + ".png"))
      raise AppError(f"{name}: {failed[0]['reason']}")
    for f in failed:
      logging.warning("%s: %s", f["name"], f["reason"])
    if not labels:
      raise AppError(f"{name}: the run left no finished result")
    return self.load(labels[0])

  def faces_of(self, label):
    """The finished images of the photo that `label` (a photo's name or one
    of its faces, OUT/<photo>/face<k>) belongs to: its faces in face order
    (left to right), or [label] for an image that is no photo's face."""
    top = label.split(os.sep)[0]
    labels = [l for l in finished(self.workdir) if l.split(os.sep)[0] == top]

    def face_index(l):
      k = l.split(os.sep)[-1][len("face"):]
      # face10 after face9, not after face1 as the folders sort.
      return int(k) if k.isdigit() else -1
    return sorted(labels, key=face_index)

  def load(self, label):
    directory = finished(self.workdir).get(label)
    if directory is None:
      raise AppError(f"{label} is not a finished image of {self.workdir}")
    photo, quad = workdir_lib.photo_and_quad(directory)
    if self.method == "diffcam":
      # The photo the run edited (its input.png, at the generator's size),
      # embedded once for every slider move.
      try:
        x = io.load_image(os.path.join(directory, "input.png"),
                          self.G.config["size"])
      except io.ImageError as e:
        raise AppError(f"{label}: {e}") from None
      inversion = differential.invert(self.models.encoder, self.G, x[None])
      return Loaded(label, directory, None, photo, quad, inversion)
    try:
      refined = refine.load_refined(os.path.join(directory, "refined"),
                                    self.G)
    except (checkpoint.CheckpointError, OSError) as e:
      # e.g. a workdir refined with another generator than --config's.
      raise AppError(f"{label}: {e}") from None
    return Loaded(label, directory, refined, photo, quad)

  # -- editing -------------------------------------------------------------

  def edit(self, loaded, values, first, last):
    """Renders the sliders' edit and writes OUT/<name>/app/ → (edit uint8,
    pasted uint8 or None, {download: path})."""
    first, last = int(first), int(last)
    if not 0 <= first < last <= self.n_latent:
      raise AppError(f"the layer range needs first < last (half-open), got "
                     f"{first}:{last}")
    codes = edits.slider_codes(loaded.refined.codes, self.sliders, values,
                               (first, last))
    # The CLI's own render path: the refined weights, offset and mask.
    image = io.to_uint8(editing.render(self.G, loaded.refined, codes)[0])
    out = os.path.join(loaded.directory, APP_DIR)
    files = {"edit": os.path.join(out, "edit.png")}
    dhr_files.write_bytes(files["edit"], dhr_files.png_bytes(image))
    pasted = None
    if loaded.photo is not None:
      # As `photos.paste_photo` pastes the run's PNGs (feathered).
      pasted = faces.paste(loaded.photo, image, np.asarray(loaded.quad))[0]
      files["pasted"] = os.path.join(out, "pasted.png")
      dhr_files.write_bytes(files["pasted"], dhr_files.png_bytes(pasted))
    dhr_files.write_json(os.path.join(out, "edit.json"), dict(
        image=loaded.label, layers=[first, last],
        sliders={s.name: float(v) for s, v in zip(self.sliders, values)}))
    files["refined"] = self.refined_zip(loaded.directory)
    return image, pasted, files

  def edit_faces(self, loaded, values, first, last):
    """The sliders' edit of several faces of one photo at once (`edit` of
    each, written to each face's app/ folder) → (the edits side by side,
    the photo with every edit pasted in or None, {download: path}) with the
    downloads in OUT/<photo>/app/."""
    if len(loaded) == 1:
      return self.edit(loaded[0], values, first, last)
    images = [self.edit(one, values, first, last)[0] for one in loaded]
    strip, pasted, files = _together(loaded, images)
    files["refined"] = self.refined_zip(
        os.path.dirname(loaded[0].directory),
        [os.path.basename(one.directory) for one in loaded])
    return strip, pasted, files

  def slide(self, loaded, index, alpha):
    """edit.method='diffcam': slider `index`'s direction at strength α,
    edited from the loaded image's kept inversion (nothing else of the
    method is redone), written to OUT/<name>/app/ → (deghosted edit uint8,
    DiffCam's heat map uint8 (s, s), pasted uint8 or None, {download:
    path}, whether the heat map is empty: no edit region, the edit is
    the photo)."""
    if not 0 <= index < len(self.sliders):
      raise AppError(f"no slider {index}")
    s = self.sliders[index]
    de = differential.edit_inversion(
        self.G, self.models.diffcam, self.models.deghosting,
        loaded.inversion, s.direction, s.target, float(alpha))
    image = io.to_uint8(np.asarray(de.deghosted[0]))
    heat = io.mask_to_uint8(np.asarray(de.heat_map[0]))
    empty = bool(de.empty[0])
    out = os.path.join(loaded.directory, APP_DIR)
    files = {"edit": os.path.join(out, "edit.png"),
             "heat_map": os.path.join(out, "heat_map.png")}
    dhr_files.write_bytes(files["edit"], dhr_files.png_bytes(image))
    dhr_files.write_bytes(files["heat_map"], dhr_files.png_bytes(heat))
    pasted = None
    if loaded.photo is not None:
      pasted = faces.paste(loaded.photo, image, np.asarray(loaded.quad))[0]
      files["pasted"] = os.path.join(out, "pasted.png")
      dhr_files.write_bytes(files["pasted"], dhr_files.png_bytes(pasted))
    dhr_files.write_json(os.path.join(out, "edit.json"), dict(
        image=loaded.label, direction=s.name, diffcam_class=s.target,
        alpha=float(alpha), empty_heat_map=empty))
    return image, heat, pasted, files, empty

  def slide_faces(self, loaded, index, alpha):
    """`slide` of several faces of one photo at once → (the edits side by
    side, their heat maps side by side, the photo with every edit pasted
    in or None, {download: path} in OUT/<photo>/app/, the labels of the
    faces whose heat map is empty)."""
    if len(loaded) == 1:
      image, heat, pasted, files, empty = self.slide(loaded[0], index, alpha)
      return image, heat, pasted, files, [loaded[0].label] * empty
    slid = [self.slide(one, index, alpha) for one in loaded]
    strip, pasted, files = _together(loaded, [r[0] for r in slid])
    heats = side_by_side([r[1] for r in slid])
    files["heat_map"] = os.path.join(os.path.dirname(files["edit"]),
                                     "heat_map.png")
    dhr_files.write_bytes(files["heat_map"], dhr_files.png_bytes(heats))
    return strip, heats, pasted, files, [
        one.label for one, r in zip(loaded, slid) if r[4]]

  def refined_zip(self, directory, subs=None):
    """OUT/<name>/app/refined.zip: refined/ under its own name, so that
    unzipping it in an image folder gives what --mode=edit reads. subs:
    the faces (face<k>) of the photo folder `directory` instead, each as
    face<k>/refined/."""
    path = os.path.join(directory, APP_DIR, "refined.zip")
    srcs = [os.path.join(directory, "refined")] if subs is None else [
        os.path.join(directory, sub, "refined") for sub in subs]
    if os.path.isfile(path) and os.path.getmtime(path) >= max(
        os.path.getmtime(os.path.join(r, f))
        for src in srcs for r, _, fs in os.walk(src) for f in fs):
      return path
    tmp = path + ".tmp"
    with zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as z:
      for src in srcs:
        for root, _, names in os.walk(src):
          for f in sorted(names):
            full = os.path.join(root, f)
            z.write(full, os.path.relpath(full, directory))
    os.replace(tmp, path)
    return path


def _together(loaded, images):
  """The edits of several faces of one photo (`images`, in `loaded`'s
  order) → (side by side, the photo with all of them pasted in or None,
  {download: path}) written to OUT/<photo>/app/."""
  top = os.path.dirname(loaded[0].directory)
  out = os.path.join(top, APP_DIR)
  files = {"edit": os.path.join(out, "edit.png")}
  strip = side_by_side(images)
  dhr_files.write_bytes(files["edit"], dhr_files.png_bytes(strip))
  pastes = [(image, np.asarray(one.quad))
            for one, image in zip(loaded, images) if one.photo is not None]
  pasted = None
  if pastes:
    pasted = faces.paste_all(loaded[0].photo, pastes)[0]
    files["pasted"] = os.path.join(out, "pasted.png")
    dhr_files.write_bytes(files["pasted"], dhr_files.png_bytes(pasted))
  return strip, pasted, files
