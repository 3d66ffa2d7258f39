r"""An interactive DHR editor in the browser (Gradio; the optional `app` extra).

    python -m dhr_jax.app --config=configs/dhr.py --workdir=OUT
    python -m dhr_jax.app --config=configs/demo.py --workdir=/tmp/dhr_app  # no weights

serves a page on 127.0.0.1 (--port, 0 = any free port): upload a photo (or
pick a finished image of the workdir), and DHR runs on it exactly as
`run.py` would (`dhr_jax.runner.run`), with a progress bar per stage and per
refinement step. With the `faces` extra the photo's largest face is detected
and FFHQ-aligned first and every result is pasted back into the photo. The
page then shows the input, the inversion, the domain mask (white =
in-domain) and one slider per configured edit direction (config.edit:
InterFaceGAN directions, GANSpace edits, the random direction) with a layer
range for the InterFaceGAN ones (`edits.sliders`, a view of the CLI's
edits). Moving a slider renders the edited codes from the saved refinement
only (`editing.render`, the CLI's own render; no refinement).

Everything goes to the workdir in run.py's layout: uploads are the run's
inputs in OUT/inputs/, results in OUT/<name>/ (OUT/<photo>/face0/ when
aligned), and the current edit of an image in OUT/<name>/app/ (edit.png,
pasted.png, refined.zip, edit.json). A session is resumed or re-edited from
the command line with

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
from dhr_jax import settings
# The page's session (state, workdir); the names the page code uses.
from dhr_jax.editor import AppError
from dhr_jax.editor import Editor
from dhr_jax.editor import finished

MASK_LABEL = "Domain mask (white = in-domain)"
# The stages a run reports (`dhr_jax.loop`), in order.
STAGES = ("segmentation", "embedding", "refinement", "metrics", "edits",
          "writing")


# --------------------------------------------------------------------------
# The page


def _images(loaded):
  d = loaded.directory
  return (dhr_files.read_png(os.path.join(d, "input.png")),
          dhr_files.read_png(os.path.join(d, "inversion.png")),
          dhr_files.read_png(os.path.join(d, "mask.png")))


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

  def shown(loaded, status):
    """Every output of the page for a newly loaded image."""
    inp, inv, mask = _images(loaded)
    zeros = [gr.update(value=0) for _ in range(n_sliders)]
    image, pasted, files = editor.edit(loaded, [0.0] * n_sliders,
                                       *editor.layers)
    return [inp, inv, mask, image,
            gr.update(value=pasted, visible=pasted is not None),
            status, loaded,
            gr.update(choices=list(finished(editor.workdir)),
                      value=loaded.label),
            *_downloads(files), *zeros]

  def failed(e):
    return [gr.update()] * 4 + [gr.update(), _message(e), gr.update(),
                                gr.update()] + [gr.update()] * 3 + [
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
      return shown(loaded, f"Refined **{loaded.label}** in "
                   f"{time.perf_counter() - t0:.0f} s; move a slider to edit.")
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
      image, pasted, files = editor.edit(loaded, values, first, last)
      moved = ", ".join(f"{s.name} {float(v):g}" for s, v in
                        zip(editor.sliders, values) if float(v) != 0)
      return [image, gr.update(value=pasted, visible=pasted is not None),
              f"Edited **{loaded.label}**: {moved or 'no edit'} "
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
    with gr.Row():
      inp = gr.Image(label="Input", format="png", interactive=False,
                     elem_id="input")
      inv = gr.Image(label="Inversion", format="png", interactive=False,
                     elem_id="inversion")
      mask = gr.Image(label=MASK_LABEL, format="png", interactive=False,
                      elem_id="mask")
      edited = gr.Image(label="Edit", format="png", interactive=False,
                        elem_id="edit")
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
                      dl_edit, dl_pasted, dl_refined, *sliders]
    upload.upload(on_upload, upload, loaded_outputs)
    pick.input(on_pick, pick, loaded_outputs)
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
              quiet=True, allowed_paths=[editor.workdir],
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
  return serve(_CONFIG.value, F.workdir, F.host, F.port, F.max_upload_mb,
               F.max_megapixels)


if __name__ == "__main__":
  _define_flags()
  absl_app.run(_main, flags_parser=_parse_flags)
