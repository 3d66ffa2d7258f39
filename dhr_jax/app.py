r"""An interactive DHR editor in the browser (Gradio; the optional `app` extra).

    python -m dhr_jax.app --config=configs/dhr.py --workdir=OUT
    python -m dhr_jax.app --config=configs/demo.py --workdir=/tmp/dhr_app  # no weights

serves a page on 127.0.0.1 (--port, 0 = any free port): upload a photo (or
pick a finished image of the workdir), and DHR runs on it exactly as
`run.py` would (`dhr_jax.runner.run`), with a progress bar per stage and per
refinement step. With the `faces` extra every face of the photo is detected
and FFHQ-aligned first (run.py's data.faces='all') and every result is
pasted back into the photo; a photo with several faces gets a Face picker:
one face (left to right), or all of them edited together. The page then
shows the input, the inversion, the domain mask (white = in-domain) and
the edit, each scaled to PREVIEW_HEIGHT pixels, and one slider per
configured edit direction (config.edit: InterFaceGAN directions, GANSpace
edits, the random direction) with a layer range for the InterFaceGAN ones.
Moving a slider renders the edited codes from the saved refinement only
(`pipeline.render_edits`, the CLI's own render; no refinement).

Everything goes to the workdir in run.py's layout: uploads are the run's
inputs in OUT/inputs/, results in OUT/<name>/ (OUT/<photo>/face<k>/ when
aligned), and the current edit of an image in OUT/<name>/app/ (edit.png,
pasted.png, refined.zip, edit.json; of all faces together in
OUT/<photo>/app/: the edits side by side, the photo with all of them
pasted, every face's refined/). A session is resumed or re-edited from the
command line with

    python run.py --config=... --config.data.input=OUT/inputs --workdir=OUT \
        [--mode=edit --config.edit.directions=...]

Bad input (not an image, no face, a file or image too large) is reported on
the page; the server keeps serving.
"""
import dataclasses
import json
import os
import socket
import sys
import threading
import time
import traceback
import zipfile

from absl import app as absl_app
from absl import flags
from absl import logging
import jax.numpy as jnp
import ml_collections
from ml_collections import config_flags
import numpy as np
from PIL import Image

from dhr_jax import checkpoint
from dhr_jax import compile_cache
from dhr_jax import editing
from dhr_jax import faces
from dhr_jax import io
from dhr_jax import photos
from dhr_jax import pipeline
from dhr_jax import refine
from dhr_jax import runner

INPUTS = "inputs"        # OUT/inputs: the uploads, the run's data.input
APP_DIR = "app"          # OUT/<name>/app: the current edit and downloads
MASK_LABEL = "Domain mask (white = in-domain)"
# The stages `pipeline.run_batch` and the runner report, in order.
STAGES = ("coarse inversion", "segmentation", "embedding", "refinement",
          "metrics", "edits", "writing")


class AppError(Exception):
  """Bad input from the page: shown to the user as one message."""


# --------------------------------------------------------------------------
# Sliders: one per configured edit direction.


@dataclasses.dataclass(frozen=True)
class Slider:
  """One edit the page offers as a slider.

  kind 'interfacegan': `direction` (D,) or (L, D), moved by α along the
  chosen layer range; kind 'ganspace': `pcs` with the edit group's
  (component, first, last) tuples, α replacing their configured strength.
  `limit`: the slider runs over [-limit, limit].
  """
  name: str
  kind: str
  limit: float
  direction: object = None
  pcs: object = None
  group: tuple = ()
  mode: str = "add"


def sliders_from_config(edit_config, G):
  """config.edit → [Slider]: the directions `runner.build_edits` renders,
  each as one slider whose range is the largest configured strength."""
  e = edit_config
  try:
    strengths = editing.parse_strengths(e.strengths)
  except editing.EditError as err:
    raise runner.UserError(f"config.edit: {err}") from None
  limit = max(abs(s) for s in strengths) or 1.0
  out = [Slider(name, "interfacegan", limit, direction=direction)
         for name, direction in runner.edit_directions(e, G)]
  if e.ganspace:
    try:
      pcs = editing.load_ganspace(e.ganspace)
      groups = editing.parse_ganspace_edits(e.ganspace_edits)
    except editing.EditError as err:
      raise runner.UserError(f"config.edit: {err}") from None
    stem = os.path.splitext(os.path.basename(e.ganspace))[0]
    for g in groups:
      group = [g] if np.isscalar(g[0]) else list(g)
      name = stem + " " + "+".join(f"{c} [{a}:{b}]" for c, a, b, _ in group)
      out.append(Slider(name, "ganspace",
                        max(abs(s) for *_, s in group) or 1.0, pcs=pcs,
                        group=tuple((c, a, b) for c, a, b, _ in group),
                        mode=e.ganspace_mode))
  return out


def edited_codes(codes, sliders, values, layers):
  """The refined codes (1, L, D) moved by every slider with α ≠ 0, in turn.

  layers: (first, last) half-open, for the InterFaceGAN sliders. A slider
  at 0 leaves the codes untouched (also in GANSpace 'set' mode)."""
  codes = jnp.asarray(codes)
  for s, alpha in zip(sliders, values):
    alpha = float(alpha)
    if alpha == 0:
      continue
    if s.kind == "interfacegan":
      codes = editing.edit_codes(codes, s.direction, [alpha], layers)[:, 0]
    else:
      group = [(c, a, b, alpha) for c, a, b in s.group]
      codes = editing.ganspace_edit(codes, s.pcs, [group], s.mode)[:, 0]
  return codes


# --------------------------------------------------------------------------
# The library calls (one place each).


def run_dhr(config, workdir, models, report):
  """`runner.run` on the workdir's inputs → its Outcome; `report(stage)`
  hears every stage and refinement step."""
  return runner.run(config, workdir, models=models, progress=report)


def load_refined(directory, G):
  return refine.load_refined(os.path.join(directory, "refined"), G)


def render(G, refined, codes):
  """One image (H, W, 3) in [-1, 1] of `codes` with the refinement: the
  CLI's own render path (`pipeline.render_edits`)."""
  spec = pipeline.EditSpec("app", ("app",), lambda c: codes[:, None])
  return pipeline.render_edits(G, refined, [spec])["app"]


def paste(photo, image_u8, quad):
  """The edit put back into the photo, as `photos.paste_photo` does for the
  run's PNGs (the uint8 image, feathered)."""
  return faces.paste(photo, image_u8, np.asarray(quad))[0]


# --------------------------------------------------------------------------
# The workdir


def finished(workdir):
  """{label: image folder} of every finished image of the workdir (run.py's
  OUT/<name>/ or OUT/<photo>/face<k>/), sorted."""
  out = {}
  if not os.path.isdir(workdir):
    return out
  for name in sorted(os.listdir(workdir)):
    top = os.path.join(workdir, name)
    if not os.path.isdir(top) or name.startswith("."):
      continue
    for d in [top] + sorted(os.path.join(top, s) for s in os.listdir(top)):
      if os.path.isdir(d) and io.read_marker(d) is not None:
        out[os.path.relpath(d, workdir)] = d
  return out


def _read_png(path):
  with Image.open(path) as im:
    return np.asarray(im.convert("RGB"))


def _photo_and_quad(directory):
  """(photo uint8, quad) when the image is an aligned face of a photo
  (photos.FACES_FILE beside it), else (None, None)."""
  parent, sub = os.path.split(directory)
  try:
    with open(os.path.join(parent, photos.FACES_FILE)) as f:
      info = json.load(f)
    k = int(sub[len("face"):])
    return io.load_photo(info["photo"]), info["faces"][k]["quad"]
  except (OSError, ValueError, KeyError, IndexError, io.ImageError):
    return None, None


@dataclasses.dataclass
class Loaded:
  """A finished image as the page edits it."""
  label: str
  directory: str
  refined: object
  photo: object = None
  quad: object = None


class Editor:
  """The state behind the page: config, generator, sliders, workdir."""

  def __init__(self, config, workdir, max_upload_mb=25, max_pixels=50e6):
    runner.validate_config(config)
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
    self.models = runner.load_models(self.config, pipeline.make_mesh())
    self.G = self.models.G
    self.sliders = sliders_from_config(config.edit, self.G)
    runner.build_edits(config.edit, self.G)  # refuses bad edits at start
    self.n_latent = self.G.n_latent
    first_last = editing.parse_layers(config.edit.layers)
    self.layers = (first_last if isinstance(first_last, tuple)
                   else (0, self.n_latent))
    # One run at a time: the runner holds the workdir's lock while it writes.
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
    data = io.png_bytes(photo)
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
      io.write_bytes(target, data)
    return name

  def invert(self, name, report):
    """Runs DHR on the workdir's inputs (finished ones are skipped) →
    the Loaded result of input `name`."""
    with self._lock:
      try:
        outcome = run_dhr(self.config, self.workdir, self.models, report)
      except runner.UserError as e:
        raise AppError(str(e)) from None
    # The photo itself (no face) or one of its faces (OUT/<photo>/face<k>).
    failed = [f for f in outcome.failed
              if f["name"] == name or f["name"].startswith(name + "/")]
    if failed:
      # A bad upload is not kept as an input: a resumed run would fail on it.
      os.remove(os.path.join(self.inputs, name + ".png"))
      raise AppError(f"{name}: {failed[0]['reason']}")
    labels = self.faces_of(io.output_name(name))
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
      sub = l.split(os.sep)[-1]
      return int(sub[len("face"):]) if sub[len("face"):].isdigit() else -1
    return sorted(labels, key=face_index)

  def load(self, label):
    directory = finished(self.workdir).get(label)
    if directory is None:
      raise AppError(f"{label} is not a finished image of {self.workdir}")
    try:
      refined = load_refined(directory, self.G)
    except (checkpoint.CheckpointError, OSError) as e:
      # e.g. a workdir refined with another generator than --config's.
      raise AppError(f"{label}: {e}") from None
    photo, quad = _photo_and_quad(directory)
    return Loaded(label, directory, refined, photo, quad)

  # -- editing -------------------------------------------------------------

  def edit(self, loaded, values, first, last):
    """Renders the sliders' edit and writes OUT/<name>/app/ → (edit uint8,
    pasted uint8 or None, {download: path})."""
    first, last = int(first), int(last)
    if not 0 <= first < last <= self.n_latent:
      raise AppError(f"the layer range needs first < last (half-open), got "
                     f"{first}:{last}")
    codes = edited_codes(loaded.refined.codes, self.sliders, values,
                         (first, last))
    image = io.to_uint8(render(self.G, loaded.refined, codes))
    out = os.path.join(loaded.directory, APP_DIR)
    files = {"edit": os.path.join(out, "edit.png")}
    io.write_bytes(files["edit"], io.png_bytes(image))
    pasted = None
    if loaded.photo is not None:
      pasted = paste(loaded.photo, image, loaded.quad)
      files["pasted"] = os.path.join(out, "pasted.png")
      io.write_bytes(files["pasted"], io.png_bytes(pasted))
    io.write_json(os.path.join(out, "edit.json"), dict(
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
    images, pastes = [], []
    for one in loaded:
      image, _, _ = self.edit(one, values, first, last)
      images.append(image)
      if one.photo is not None:
        pastes.append((image, np.asarray(one.quad)))
    top = os.path.dirname(loaded[0].directory)
    out = os.path.join(top, APP_DIR)
    files = {"edit": os.path.join(out, "edit.png")}
    strip = side_by_side(images)
    io.write_bytes(files["edit"], io.png_bytes(strip))
    pasted = None
    if pastes:
      pasted = faces.paste_all(loaded[0].photo, pastes)[0]
      files["pasted"] = os.path.join(out, "pasted.png")
      io.write_bytes(files["pasted"], io.png_bytes(pasted))
    files["refined"] = self.refined_zip(
        top, [os.path.basename(one.directory) for one in loaded])
    return strip, pasted, files

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


# --------------------------------------------------------------------------
# The page


# The previews' height on the page: the stand-in's 64² images (and any
# face) are drawn scaled up to it, not at their own few pixels.
PREVIEW_HEIGHT = 320
ALL_FACES = "all faces"
# Gradio draws an image no larger than its own size (object-fit
# scale-down): the previews fill their frame instead, pixels kept sharp.
PAGE_CSS = "\n".join(
    f"#{e} img {{ object-fit: contain; image-rendering: pixelated; }}"
    for e in ("input", "inversion", "mask", "edit"))


def side_by_side(images, gap=4):
  """uint8 images (H, W, 3) of one height in a row, `gap` white columns
  between them (the faces of a photo edited together)."""
  tiles = []
  for i, image in enumerate(images):
    if i:
      tiles.append(np.full((image.shape[0], gap, 3), 255, np.uint8))
    tiles.append(image)
  return np.concatenate(tiles, axis=1)


def _images(loaded):
  """(input, inversion, mask) of a Loaded, or of several side by side."""
  many = loaded if isinstance(loaded, list) else [loaded]
  return tuple(side_by_side([_read_png(os.path.join(one.directory, f))
                             for one in many])
               for f in ("input.png", "inversion.png", "mask.png"))


def _message(e):
  """The page's one line for a failure; anything unexpected is logged with
  its traceback on the server and shown without it."""
  if isinstance(e, AppError):
    return f"**error:** {e}"
  logging.error("app: %s", traceback.format_exc())
  return (f"**error:** {type(e).__name__}: {e} (internal; the server log "
          "has the details)")


def build_ui(editor):
  """The Gradio Blocks of the page."""
  # gradio is the optional `app` extra; dhr_jax itself does not need it.
  import gradio as gr

  n_sliders = len(editor.sliders)

  def with_progress(work, progress):
    """work(report) in a worker thread while this (the event's) thread
    shows its latest stage: Gradio draws progress only when it is called
    from the event's own thread, and the refinement steps arrive on XLA's
    callback thread."""
    latest, result = [None], {}

    def target():
      try:
        result["value"] = work(lambda stage: latest.__setitem__(0, stage))
      except Exception as e:  # re-raised in the event's thread
        result["error"] = e
    worker = threading.Thread(target=target, daemon=True)
    worker.start()
    drawn = None
    while worker.is_alive():
      worker.join(0.25)
      stage = latest[0]
      if stage is not None and stage != drawn:
        drawn = stage
        head, _, count = stage.partition(" step ")
        k, _, n = count.partition("/")
        if n.isdigit() and int(n) > 0:
          progress((int(k), int(n)), desc=head, unit="steps")
        else:
          i = STAGES.index(stage) if stage in STAGES else len(STAGES) - 1
          progress((i + 1, len(STAGES)), desc=stage, unit="stages")
    if "error" in result:
      raise result["error"]
    return result["value"]

  def face_choices(label):
    """The Face picker for the photo of `label`: (shown name, label) per
    face, then every face at once; hidden for a single image."""
    labels = editor.faces_of(label)
    if len(labels) < 2:
      return gr.update(choices=[], value=None, visible=False)
    choices = [(os.path.basename(l), l) for l in labels]
    return gr.update(choices=choices + [(ALL_FACES, ALL_FACES)],
                     visible=True)

  def shown(loaded, status):
    """Every output of the page for a newly loaded image (a Loaded) or
    every face of a photo (a list of them)."""
    inp, inv, mask = _images(loaded)
    zeros = [gr.update(value=0) for _ in range(n_sliders)]
    many = isinstance(loaded, list)
    first = loaded[0] if many else loaded
    image, pasted, files = editor.edit_faces(
        loaded if many else [loaded], [0.0] * n_sliders, *editor.layers)
    picker = face_choices(first.label)
    if picker.get("visible"):
      picker["value"] = ALL_FACES if many else first.label
    return [inp, inv, mask, image,
            gr.update(value=pasted, visible=pasted is not None),
            status, loaded,
            gr.update(choices=list(finished(editor.workdir)),
                      value=first.label),
            *_downloads(files), picker, *zeros]

  def failed(e):
    return [gr.update()] * 4 + [gr.update(), _message(e), gr.update(),
                                gr.update()] + [gr.update()] * 4 + [
                                    gr.update()] * n_sliders

  def _downloads(files):
    return [gr.update(value=files.get(k), visible=k in files)
            for k in ("edit", "pasted", "refined")]

  def on_upload(path, progress=gr.Progress()):
    try:
      t0 = time.perf_counter()
      name = editor.add_upload(path)
      progress(0, desc="starting")
      loaded = with_progress(lambda report: editor.invert(name, report),
                             progress)
      n = len(editor.faces_of(loaded.label))
      pick_one = (f" {n} faces found: pick one (or all) under Face;"
                  if n > 1 else "")
      return shown(loaded, f"Refined **{loaded.label}** in "
                   f"{time.perf_counter() - t0:.0f} s;{pick_one} move a "
                   "slider to edit.")
    except Exception as e:  # the page reports it; the server goes on
      return failed(e)

  def on_face(choice, loaded):
    if not choice or loaded is None:
      return failed(AppError("pick a face"))
    try:
      current = loaded[0] if isinstance(loaded, list) else loaded
      if choice == ALL_FACES:
        labels = editor.faces_of(current.label)
        return shown([editor.load(l) for l in labels],
                     f"Loaded all {len(labels)} faces of "
                     f"**{labels[0].split(os.sep)[0]}**; move a slider to "
                     "edit them together.")
      return shown(editor.load(choice), f"Loaded **{choice}**; move a "
                   "slider to edit.")
    except Exception as e:  # the page reports it; the server goes on
      return failed(e)

  def on_pick(label):
    if not label:
      return failed(AppError("pick an image"))
    try:
      return shown(editor.load(label), f"Loaded **{label}**; move a slider "
                   "to edit.")
    except Exception as e:  # the page reports it; the server goes on
      return failed(e)

  def on_edit(loaded, first, last, *values):
    if loaded is None:
      return [gr.update(), gr.update(),
              "**error:** upload a photo or pick an image first"] + [
                  gr.update()] * 3
    try:
      many = loaded if isinstance(loaded, list) else [loaded]
      image, pasted, files = editor.edit_faces(many, values, first, last)
      moved = ", ".join(f"{s.name} {float(v):g}" for s, v in
                        zip(editor.sliders, values) if float(v) != 0)
      what = ", ".join(one.label for one in many)
      return [image, gr.update(value=pasted, visible=pasted is not None),
              f"Edited **{what}**: {moved or 'no edit'} "
              f"(layers {int(first)}:{int(last)})", *_downloads(files)]
    except Exception as e:  # the page reports it; the server goes on
      return [gr.update(), gr.update(), _message(e)] + [gr.update()] * 3

  with gr.Blocks(title="DHR editor", analytics_enabled=False) as page:
    gr.Markdown("## DHR: invert a photo once, then edit it with sliders")
    with gr.Row():
      upload = gr.File(label="Photo (png, jpg, webp)", type="filepath",
                       elem_id="photo")
      pick = gr.Dropdown(choices=list(finished(editor.workdir)), value=None,
                         label=f"…or a finished image of {editor.workdir}",
                         elem_id="pick", interactive=True)
    status = gr.Markdown("Upload a photo to start."
                         + (" Faces are detected and aligned." if editor.align
                            else " (No face alignment: the `faces` extra is "
                            "not installed; give aligned faces.)"),
                         elem_id="status")
    face = gr.Radio(choices=[], label="Face (the photo's faces, left to "
                    "right)", visible=False, elem_id="face",
                    interactive=True)
    with gr.Row():
      inp, inv, mask, edited = [
          gr.Image(label=label, format="png", interactive=False,
                   elem_id=elem_id, height=PREVIEW_HEIGHT, min_width=240)
          for label, elem_id in (("Input", "input"),
                                 ("Inversion", "inversion"),
                                 (MASK_LABEL, "mask"), ("Edit", "edit"))]
    pasted = gr.Image(label="Edit pasted into the photo", format="png",
                      interactive=False, visible=False, elem_id="pasted")
    sliders = [gr.Slider(-s.limit, s.limit, value=0, step=s.limit / 20,
                         label=s.name, elem_id=f"slider_{i}")
               for i, s in enumerate(editor.sliders)]
    with gr.Row():
      first = gr.Slider(0, editor.n_latent - 1, value=editor.layers[0],
                        step=1, label="First edited layer (InterFaceGAN)",
                        elem_id="layer_first")
      last = gr.Slider(1, editor.n_latent, value=editor.layers[1], step=1,
                       label="Last edited layer + 1", elem_id="layer_last")
    with gr.Row():
      dl_edit = gr.DownloadButton("Edit (PNG)", visible=False,
                                  elem_id="download_edit")
      dl_pasted = gr.DownloadButton("Pasted photo (PNG)", visible=False,
                                    elem_id="download_pasted")
      dl_refined = gr.DownloadButton("refined/ (zip)", visible=False,
                                     elem_id="download_refined")
    state = gr.State(None)

    loaded_outputs = [inp, inv, mask, edited, pasted, status, state, pick,
                      dl_edit, dl_pasted, dl_refined, face, *sliders]
    upload.upload(on_upload, upload, loaded_outputs)
    pick.input(on_pick, pick, loaded_outputs)
    face.input(on_face, [face, state], loaded_outputs)
    edit_outputs = [edited, pasted, status, dl_edit, dl_pasted, dl_refined]
    for control in sliders + [first, last]:
      control.release(on_edit, [state, first, last, *sliders], edit_outputs,
                      trigger_mode="always_last")
  return page


# --------------------------------------------------------------------------
# Command line


def free_port(host):
  with socket.socket() as s:
    s.bind((host, 0))
    return s.getsockname()[1]


def serve(config, workdir, host="127.0.0.1", port=7860, max_upload_mb=25,
          max_megapixels=50):
  """Loads the models, builds the page and serves it until interrupted."""
  os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
  try:
    io.check_creatable(workdir)
    editor = Editor(config, workdir, max_upload_mb, max_megapixels * 1e6)
  except (runner.UserError, io.WorkdirError, editing.EditError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  page = build_ui(editor)
  port = port or free_port(host)
  page.queue(default_concurrency_limit=1)
  page.launch(server_name=host, server_port=port, prevent_thread_lock=True,
              quiet=True, allowed_paths=[editor.workdir], css=PAGE_CSS,
              max_file_size=int(max_upload_mb * 2**20), show_error=False)
  # Tests and scripts wait for this line.
  print(f"DHR editor: http://{host}:{port} (workdir {editor.workdir})",
        flush=True)
  try:
    while True:
      time.sleep(3600)
  except KeyboardInterrupt:
    page.close()
  return 0


_CONFIG = None


def _define_flags():
  # Defined on first use, not at import: importing dhr_jax.app (the tests
  # do) must not add flags to a program that has its own.
  global _CONFIG
  _CONFIG = config_flags.DEFINE_config_file(
      "config", None, "Run config, e.g. configs/dhr.py or configs/demo.py "
      "(no weights).", lock_config=False)
  flags.DEFINE_string("workdir", "dhr_app", "Where every run of the page "
                      "writes (run.py's layout; inputs in WORKDIR/inputs).")
  flags.DEFINE_string("host", "127.0.0.1", "Address to serve on.")
  flags.DEFINE_integer("port", 7860, "Port; 0 = any free port.")
  flags.DEFINE_float("max_upload_mb", 25, "Largest upload accepted.")
  flags.DEFINE_float("max_megapixels", 50, "Largest photo accepted.")
  flags.DEFINE_string("compilation_cache", "", "JAX's persistent "
                      "compilation cache folder ('' = the default, 'none' = "
                      "off; see dhr_jax.compile_cache).")


def _parse_flags(argv):
  return runner.parse_flags(argv, _CONFIG)


def _main(argv):
  if len(argv) > 1:
    print(f"error: unexpected arguments: {' '.join(argv[1:])}",
          file=sys.stderr)
    return 2
  if _CONFIG.value is None:
    print("error: --config is required (e.g. --config=configs/demo.py)",
          file=sys.stderr)
    return 2
  try:
    # gradio is the optional `app` extra; say so instead of a traceback.
    import gradio  # noqa: F401
  except ImportError:
    print("error: the app needs the optional `app` extra: pip install -e "
          "'.[app]'", file=sys.stderr)
    return 2
  F = flags.FLAGS
  compile_cache.enable(F.compilation_cache)
  return serve(_CONFIG.value, F.workdir, F.host, F.port, F.max_upload_mb,
               F.max_megapixels)


if __name__ == "__main__":
  _define_flags()
  absl_app.run(_main, flags_parser=_parse_flags)
