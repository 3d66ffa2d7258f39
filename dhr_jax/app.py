r"""An interactive DHR editor in the browser (Gradio; the optional `app` extra).

    python -m dhr_jax.app --config=configs/dhr.py --workdir=OUT
    python -m dhr_jax.app --config=configs/demo.py --workdir=/tmp/dhr_app  # no weights

serves a page on 127.0.0.1 (--port, 0 = any free port): upload a photo (or
pick a finished image of the workdir), and DHR runs on it exactly as
`run.py` would (`dhr_jax.runner.run`), with a progress bar per stage and per
step. With the `faces` extra every face of the photo is detected and
FFHQ-aligned first (run.py's data.faces='all') and every result is pasted
back into the photo; a photo with several faces gets a Face picker: one
face (left to right), or all of them edited together. The page then shows
the input, the inversion, the domain mask (white = in-domain) and the
edit, each scaled to PREVIEW_HEIGHT pixels, and one slider per configured
edit direction (config.edit: InterFaceGAN directions, GANSpace edits, the
random direction) with a layer range for the InterFaceGAN ones
(`edits.sliders`, a view of the CLI's edits). Moving a slider renders the
edited codes from the saved refinement only (`editing.render`, the CLI's
own render; no refinement).

With --config.edit.method=diffcam (editing via differential activations,
`dhr_jax.differential`: pSp, DiffCam, deghosting; config.edit.directions
the published `.npy` directions) the upload runs that method instead (its
edits at config.edit.alpha), the page embeds the image with pSp once for
its sliders (`Editor.load`), and each direction's slider moves its
strength α (starting at config.edit.alpha, the published 20): the page
shows the deghosted edit of the direction moved and, in place of the
domain mask, DiffCam's heat map of that edit (white = where the edit is
blended in); only that direction's edit is redone (`Editor.slide`).

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
import os
import socket
import sys
import threading
import time
import traceback

from absl import app as absl_app
from absl import flags
from absl import logging
from ml_collections import config_flags

from dhr_jax import cli
from dhr_jax import compile_cache
from dhr_jax import editing
from dhr_jax import files as dhr_files
from dhr_jax import precision
from dhr_jax import settings
# The page's session (state, workdir); the names the page code uses.
from dhr_jax.editor import AppError
from dhr_jax.editor import Editor
from dhr_jax.editor import finished
from dhr_jax.editor import side_by_side

MASK_LABEL = "Domain mask (white = in-domain)"
# edit.method='diffcam' shows DiffCam's map in the mask's place.
HEAT_MAP_LABEL = "DiffCam heat map of the direction moved (white = edited)"
# The stages a run reports (`dhr_jax.loop`), in order.
STAGES = ("coarse inversion", "segmentation", "embedding", "refinement",
          "metrics", "edits", "writing")
# The previews' height on the page: the stand-in's 64² images (and any
# face) are drawn scaled up to it, not at their own few pixels.
PREVIEW_HEIGHT = 320
ALL_FACES = "all faces"
# Gradio draws an image no larger than its own size (object-fit
# scale-down): the previews fill their frame instead, pixels kept sharp.
PAGE_CSS = "\n".join(
    f"#{e} img {{ object-fit: contain; image-rendering: pixelated; }}"
    for e in ("input", "inversion", "mask", "edit"))


# --------------------------------------------------------------------------
# The page


def _images(loaded, names=("input.png", "inversion.png", "mask.png")):
  """(input, inversion, mask) of a Loaded, or of several side by side."""
  many = loaded if isinstance(loaded, list) else [loaded]
  return tuple(side_by_side([dhr_files.read_png(os.path.join(one.directory,
                                                              f))
                             for one in many])
               for f in names)


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
  diffcam = editor.method == "diffcam"

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
    zeros = [gr.update(value=s.value) for s in editor.sliders]
    many = isinstance(loaded, list)
    first = loaded[0] if many else loaded
    if diffcam:
      # The first direction at its configured α, with its heat map; every
      # slider stands at α, so the status says which one is shown.
      inp, inv = _images(loaded, ("input.png", "inversion.png"))
      image, mask, pasted, files, _ = editor.slide_faces(
          loaded if many else [loaded], 0, editor.sliders[0].value)
      status = (f"{status} Showing {editor.sliders[0].name} at α = "
                f"{editor.sliders[0].value:g}; move a slider to see its "
                "direction.")
    else:
      inp, inv, mask = _images(loaded)
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
      done = "Embedded" if diffcam else "Refined"
      return shown(loaded, f"{done} **{loaded.label}** in "
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

  def slide_of(index):
    return lambda loaded, alpha: on_slide(index, loaded, alpha)

  def on_slide(index, loaded, alpha):
    """edit.method='diffcam': slider `index` moved to α."""
    if loaded is None:
      return [gr.update(), gr.update(), gr.update(),
              "**error:** upload a photo or pick an image first"] + [
                  gr.update()] * 3
    try:
      many = loaded if isinstance(loaded, list) else [loaded]
      image, heat, pasted, files, empty = editor.slide_faces(many, index,
                                                             alpha)
      what = ", ".join(one.label for one in many)
      note = (f"; DiffCam's heat map is empty for {', '.join(empty)}: no "
              "edit region, the edit is the photo" if empty else "")
      return [image, heat, gr.update(value=pasted,
                                     visible=pasted is not None),
              f"Edited **{what}**: {editor.sliders[index].name} "
              f"α = {float(alpha):g}{note}", *_downloads(files)]
    except Exception as e:  # the page reports it; the server goes on
      return [gr.update(), gr.update(), gr.update(), _message(e)] + [
          gr.update()] * 3

  with gr.Blocks(title="DHR editor", analytics_enabled=False) as page:
    gr.Markdown("## Editing via differential activations: embed a photo "
                "with pSp once, then move a direction's strength α" if diffcam
                else "## DHR: invert a photo once, then edit it with sliders")
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
                                 (HEAT_MAP_LABEL if diffcam else
                                  MASK_LABEL, "mask"), ("Edit", "edit"))]
    pasted = gr.Image(label="Edit pasted into the photo", format="png",
                      interactive=False, visible=False, elem_id="pasted")
    # A diffcam slider steps by 1 so that the published α = 20 is on it.
    sliders = [gr.Slider(-s.limit, s.limit, value=s.value,
                         step=1 if s.kind == "diffcam" else s.limit / 20,
                         label=(f"{s.name} (α)" if s.kind == "diffcam"
                                else s.name), elem_id=f"slider_{i}")
               for i, s in enumerate(editor.sliders)]
    # The differential edit moves every layer: no layer range.
    with gr.Row(visible=not diffcam):
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
    if diffcam:
      # Each slider redoes its own direction's edit only.
      for i, control in enumerate(sliders):
        control.release(slide_of(i), [state, control],
                        [edited, mask, *edit_outputs[1:]],
                        trigger_mode="always_last")
    else:
      for control in sliders + [first, last]:
        control.release(on_edit, [state, first, last, *sliders],
                        edit_outputs, trigger_mode="always_last")
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
    dhr_files.check_creatable(workdir)
    editor = Editor(config, workdir, max_upload_mb, max_megapixels * 1e6)
  except (settings.UserError, dhr_files.WorkdirError,
          editing.EditError) as e:
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
  flags.DEFINE_enum("precision", precision.DEFAULT, list(precision.CHOICES),
                    "Precision of float32 products (see dhr_jax.precision).")


def _parse_flags(argv):
  return cli.parse_flags(argv, _CONFIG)


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
  precision.set_default(F.precision)
  return serve(_CONFIG.value, F.workdir, F.host, F.port, F.max_upload_mb,
               F.max_megapixels)


if __name__ == "__main__":
  _define_flags()
  absl_app.run(_main, flags_parser=_parse_flags)
