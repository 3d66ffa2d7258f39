r"""DHR over a folder of images: inversions, masks, edits and metrics.

    python run.py --config=configs/dhr.py --config.data.input=DIR --workdir=OUT
    python run.py --config=configs/demo.py --workdir=/tmp/demo   # no weights

Writes, per image, OUT/<name>/ with inversion.png, mask.png, input.png,
grid.png (input | inversion | mask | edits), edits/<edit>_<strength>.png,
refined/ (weight delta, offset, mask, codes) and the marker done.json, which
is written last; with --config.save.intermediate also embedding.png,
coarse.png, superpixels.png, error_map.png (and parsing.png with a parser).
Run level: OUT/metrics.csv and OUT/summary.json.

With --config.data.align=True the inputs are raw photos: every face found
(the largest, or all with --config.data.faces=all) is FFHQ-aligned and run
as OUT/<photo>/face<k>/, and its inversion and edits are also pasted back
into the photo (face<k>/pasted/, OUT/<photo>/pasted_all.png); see
dhr_jax/photos.py.

Re-running with the same workdir skips the images whose outputs are complete,
so a killed run is resumed by starting it again. Editing again with other
directions, without refining again:

    python run.py --config=configs/dhr.py --workdir=OUT --mode=edit \
        --config.edit.directions=smile=smile.npy --config.edit.strengths=-2,2

Exit status 0 when every image succeeded, 1 when some failed (one summary
line on stderr, details in OUT/summary.json), 2 for unusable settings.
"""
import dataclasses
import hashlib
import json
import os
import platform
import shutil
import sys
import time

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags
import numpy as np

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Config file, e.g. configs/dhr.py or configs/demo.py.",
    lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Output directory.")
_MODE = flags.DEFINE_enum(
    "mode", "run", ["run", "edit"],
    "run: invert, refine and edit every input; edit: render config.edit "
    "again for every finished image of --workdir from its saved refined/ "
    "state (no refinement).")

# Called with the path of every output file just written (tests use it to
# interrupt a run at a precise point; progress tools may use it too).
on_file_written = None


class UserError(Exception):
  """A problem the user fixes (paths, settings): reported in one line."""


# --------------------------------------------------------------------------
# Models


def _missing(path, what, command):
  return UserError(f"{what} {path!r} not found. Convert the released PyTorch "
                   f"file first: {command}")


_E4E_CMD = ("python -m converters.e4e --src e4e_ffhq_encode.pt "
            "--dst {path}")
_G_CMD = "python -m converters.stylegan2 --src stylegan2-ffhq-config-f.pt --dst {path}"
_FARL_CMD = ("python -m converters.farl --src "
             "face_parsing.farl.celebm.main_ema_181500_jit.pt --dst {path}")

_MODEL_CACHE = {}


def _checkpoint_stamp(path):
  """Identifies a checkpoint's contents cheaply (its config files' mtimes)."""
  if not path:
    return None
  stamps = []
  for root, _, files in os.walk(path):
    if "config.json" in files:
      stamps.append((root, os.stat(os.path.join(root, "config.json")).st_mtime_ns))
  return tuple(sorted(stamps))


def load_generator(config):
  """The generator of `config.model` (a converted checkpoint or the stand-in)."""
  from dhr_jax import checkpoint
  from dhr_jax.models import stylegan2
  m = config.model
  if m.checkpoint == "stand-in":
    s = m.stand_in
    import jax
    return stylegan2.init_generator(
        jax.random.PRNGKey(int(s.seed)), size=int(s.size),
        style_dim=int(s.style_dim), n_mlp=int(s.n_mlp),
        channels=int(s.channels), noise_strength=float(s.noise_strength))
  path = m.generator or m.checkpoint
  if not path or not os.path.exists(path):
    cmd = (_G_CMD if m.generator else _E4E_CMD).format(path=path or "DIR")
    raise _missing(path, "generator checkpoint", cmd)
  try:
    return stylegan2.load_generator(path)
  except checkpoint.CheckpointError as e:
    raise UserError(f"{e} (convert with: "
                    f"{(_G_CMD if m.generator else _E4E_CMD).format(path=path)})"
                    ) from None


def load_models(config, mesh=None):
  """Loads (or reuses, within one process) every model the config needs."""
  from dhr_jax import checkpoint
  from dhr_jax import lpips
  from dhr_jax import pipeline
  m = config.model
  method = config.embedding.method
  if method not in pipeline.EMBEDDINGS:
    raise UserError(f"config.embedding.method must be one of "
                    f"{pipeline.EMBEDDINGS}, got {method!r}")
  key = json.dumps(dict(
      model=m.to_dict(), method=method, seed=int(config.seed),
      n_mean_latent=int(config.embedding.n_mean_latent),
      stamps=[_checkpoint_stamp(p) for p in (m.checkpoint, m.generator,
                                             m.parser)],
      devices=None if mesh is None else [str(d) for d in mesh.devices.flat]),
      sort_keys=True, default=str)
  if key in _MODEL_CACHE:
    return _MODEL_CACHE[key]
  G = load_generator(config)
  encoder = parser = None
  if method == "e4e":
    if m.checkpoint == "stand-in" or not os.path.exists(m.checkpoint):
      raise _missing(m.checkpoint, "e4e checkpoint",
                     _E4E_CMD.format(path=m.checkpoint or "DIR"))
    from dhr_jax.models import e4e
    try:
      encoder = e4e.load_encoder(m.checkpoint)
    except checkpoint.CheckpointError as e:
      raise UserError(f"{e} (convert with: "
                      f"{_E4E_CMD.format(path=m.checkpoint)})") from None
  if m.parser:
    if not os.path.exists(m.parser):
      raise _missing(m.parser, "parser checkpoint",
                     _FARL_CMD.format(path=m.parser))
    from dhr_jax.models import farl
    try:
      parser = farl.load_parser(m.parser)
    except checkpoint.CheckpointError as e:
      raise UserError(f"{e} (convert with: "
                      f"{_FARL_CMD.format(path=m.parser)})") from None
  try:
    vgg, alex = lpips.load("vgg"), lpips.load("alex")
  except lpips.LPIPSWeightsError as e:
    raise UserError(str(e)) from None
  models = pipeline.prepare_models(
      G, vgg, alex, encoder=encoder, parser=parser, seed=int(config.seed),
      n_mean_latent=int(config.embedding.n_mean_latent), mesh=mesh)
  _MODEL_CACHE[key] = models
  return models


def _face_models(config):
  """dlib's models when the `faces` extra is installed, else None; with
  config.data.align they are required and the settings are checked."""
  from dhr_jax import faces
  from dhr_jax import photos
  d = config.data
  if d.align:
    if d.input == "synthetic":
      raise UserError("config.data.align=True aligns faces in photos: set "
                      "--config.data.input=PHOTO_OR_DIR")
    if d.faces not in ("largest", "all"):
      raise UserError(f"config.data.faces must be 'largest' or 'all', got "
                      f"{d.faces!r}")
    if int(d.min_face_size) < 0:
      raise UserError(f"config.data.min_face_size must be ≥ 0, got "
                      f"{d.min_face_size}")
  try:
    return photos.face_models(required=bool(d.align))
  except faces.FacesUnavailable as e:
    raise UserError(f"config.data.align=True: {e}") from None


def build_edits(edit_config, G):
  """config.edit → [EditSpec] (InterFaceGAN, GANSpace, random direction)."""
  from dhr_jax import editing
  from dhr_jax import pipeline
  e = edit_config
  out = []
  try:
    strengths = editing.parse_strengths(e.strengths)
    layers = editing.parse_layers(e.layers)
    for item in str(e.directions).split(","):
      if not item.strip():
        continue
      if "=" not in item:
        raise UserError(f"config.edit.directions: expected name=path, got "
                        f"{item.strip()!r}")
      name, path = (x.strip() for x in item.split("=", 1))
      out.append(pipeline.interfacegan(name, editing.load_direction(path),
                                       strengths, layers))
    if e.ganspace:
      pcs = editing.load_ganspace(e.ganspace)
      name = os.path.splitext(os.path.basename(e.ganspace))[0]
      out.append(pipeline.ganspace(
          name, pcs, editing.parse_ganspace_edits(e.ganspace_edits),
          e.ganspace_mode))
    elif e.ganspace_edits:
      raise UserError("config.edit.ganspace_edits needs config.edit.ganspace "
                      "(the components file)")
    if int(e.random_direction_seed) >= 0:
      out.append(pipeline.interfacegan(
          "random", pipeline.random_direction(int(e.random_direction_seed),
                                              G.config["style_dim"]),
          strengths, layers))
  except editing.EditError as err:
    raise UserError(f"config.edit: {err}") from None
  labels = [l for spec in out for l in spec.labels]
  if len(set(labels)) != len(labels):
    raise UserError(f"config.edit gives two edits the same name: {labels}")
  # Shapes are checked now, on a dummy code, not after an hour of refinement.
  import jax.numpy as jnp
  probe = jnp.zeros((1, G.n_latent, G.config["style_dim"]), jnp.float32)
  for spec in out:
    try:
      spec.fn(probe)
    except editing.EditError as err:
      raise UserError(f"config.edit ({spec.name}): {err}") from None
  return out


# --------------------------------------------------------------------------
# Inputs


def _synthetic_inputs(config, workdir, G):
  """Writes the demo's synthetic targets to OUT/inputs (once) → (dir, gt)."""
  from dhr_jax import io
  from dhr_jax import pipeline
  s = config.data.synthetic
  directory = os.path.join(workdir, "inputs")
  gt = {}
  for i in range(int(s.count)):
    name = f"synthetic_{i}"
    target, gt[name] = pipeline.synthetic_case(G, int(s.seed), i,
                                               float(s.patch_fraction))
    path = os.path.join(directory, name + ".png")
    data = io.png_bytes(target)
    if not os.path.isfile(path) or open(path, "rb").read() != data:
      io.write_bytes(path, data)
  return directory, gt


def fingerprint(config):
  """Hash of the settings that determine an image's outputs.

  Edits (re-done by --mode=edit) and the batch size (results do not depend
  on it) are left out; a marker with another fingerprint is stale.
  """
  d = config.to_dict()
  d.pop("edit", None)
  d.pop("batch_size", None)
  return hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()
                        ).hexdigest()[:16]


# --------------------------------------------------------------------------
# Writing one image


def _write(path, data):
  from dhr_jax import io
  io.write_bytes(path, data)
  if on_file_written is not None:
    on_file_written(path)


def _write_png(directory, rel, array, files):
  from dhr_jax import io
  _write(os.path.join(directory, rel), io.png_bytes(array))
  files.append(rel)


def _grid(input_u8, inversion_u8, mask_u8, edit_tiles):
  from dhr_jax import io
  return io.grid([input_u8, inversion_u8, mask_u8] + list(edit_tiles))


def _write_edits(directory, rendered, files):
  """edits/<label>.png for every rendered edit; returns the uint8 tiles."""
  from dhr_jax import io
  edits_dir = os.path.join(directory, "edits")
  if os.path.isdir(edits_dir):
    shutil.rmtree(edits_dir)
  tiles = []
  for label, img in rendered.items():
    u8 = io.to_uint8(img)
    _write_png(directory, f"edits/{label}.png", u8, files)
    tiles.append(u8)
  return tiles


def write_image(workdir, r, G, config, source, stamp, seconds_before=0.0,
                notes=None):
  """All outputs of one successful image, the marker last.

  seconds_before: this image's share of the batch's compute time; the
  marker records it plus the time spent writing. notes: more entries for
  the marker (e.g. where the parser's landmarks came from).
  """
  from dhr_jax import io
  from dhr_jax import refine
  t0 = time.perf_counter()
  directory = os.path.join(workdir, io.output_name(r.name))
  if os.path.isdir(directory):
    shutil.rmtree(directory)  # leftovers of an interrupted attempt
  os.makedirs(directory)
  files = []
  refine.save_refined(os.path.join(directory, "refined"), r.refined, G,
                      overwrite=True)
  files.append("refined/config.json")
  if on_file_written is not None:
    on_file_written(os.path.join(directory, "refined"))
  inp, inv = io.to_uint8(r.target), io.to_uint8(r.image)
  mask = io.mask_to_uint8(r.mask)
  _write_png(directory, "input.png", inp, files)
  _write_png(directory, "inversion.png", inv, files)
  _write_png(directory, "mask.png", mask, files)
  if config.save.intermediate:
    _write_png(directory, "embedding.png", io.to_uint8(r.embedding), files)
    _write_png(directory, "coarse.png", io.to_uint8(r.coarse), files)
    _write_png(directory, "superpixels.png",
               io.superpixel_picture(inp, r.superpixels, r.boundaries), files)
    _write_png(directory, "error_map.png", io.error_picture(r.error_map),
               files)
    if r.parsing is not None:
      _write_png(directory, "parsing.png", io.parsing_picture(r.parsing),
                 files)
  tiles = _write_edits(directory, r.edits, files)
  _write_png(directory, "grid.png", _grid(inp, inv, mask, tiles), files)
  seconds = seconds_before + time.perf_counter() - t0
  marker = dict(name=r.name, source=source, fingerprint=stamp,
                metrics=dict(r.metrics, seconds=seconds),
                edits=list(r.edits), files=files, **(notes or {}))
  path = os.path.join(directory, io.MARKER)
  io.write_json(path, marker)
  if on_file_written is not None:
    on_file_written(path)
  return marker


# --------------------------------------------------------------------------
# Run


def _versions():
  import flax
  import jax
  import jaxlib
  import optax
  import dhr_jax
  v = dict(dhr_jax=dhr_jax.__version__, jax=jax.__version__,
           jaxlib=jaxlib.__version__, flax=flax.__version__,
           optax=optax.__version__, numpy=np.__version__,
           python=platform.python_version(), platform=platform.platform())
  try:
    import orbax.checkpoint as ocp
    v["orbax"] = getattr(ocp, "__version__", "?")
  except ImportError:
    pass
  return v


@dataclasses.dataclass
class Outcome:
  """What a run or an edit pass did; `status` is the process exit code."""
  done: list
  failed: list   # [{'name', 'file', 'reason'}]
  skipped: int
  status: int
  message: str


def _failure_line(total, done, failed):
  head = f"DHR: {len(done)} of {total} images done, {len(failed)} failed: "
  parts = [f"{f['file']} ({f['reason']})" for f in failed[:5]]
  more = f"; and {len(failed) - 5} more" if len(failed) > 5 else ""
  return head + "; ".join(parts) + more + " — see summary.json"


def _short(reason, limit=160):
  reason = " ".join(str(reason).split())
  return reason if len(reason) <= limit else reason[:limit - 1] + "…"


def _print_table(rows, columns, file=sys.stdout):
  if not rows:
    return
  widths = [max(len(c), 8) for c in columns]
  fmt = lambda v: f"{v:.4g}" if isinstance(v, float) else str(v)
  print("  ".join(c.ljust(w) for c, w in zip(columns, widths)), file=file)
  for r in rows:
    print("  ".join(fmt(r.get(c, "")).ljust(w)
                    for c, w in zip(columns, widths)), file=file)


def run(config, workdir, *, refine_fn=None):
  """Inverts, refines and edits every input of `config` into `workdir`."""
  from dhr_jax import io
  from dhr_jax import pipeline
  t_start = time.time()
  workdir = os.path.abspath(workdir)
  try:
    io.check_writable(workdir)  # before any compute
  except io.WorkdirError as e:
    raise UserError(str(e)) from None
  if int(config.batch_size) < 1:
    raise UserError(f"config.batch_size must be ≥ 1, got {config.batch_size}")
  if config.refine.mode not in ("hybrid", "weight", "feature"):
    raise UserError(f"config.refine.mode must be hybrid, weight or feature, "
                    f"got {config.refine.mode!r}")
  gt = None
  source = config.data.input
  if source != "synthetic":
    try:
      entries = io.list_images(source)
    except io.ImageError as e:
      raise UserError(str(e)) from None
  face_models = _face_models(config)
  mesh = pipeline.make_mesh()
  models = load_models(config, mesh)
  G = models.G
  edits = build_edits(config.edit, G)
  if source == "synthetic":
    source, gt = _synthetic_inputs(config, workdir, G)
    entries = io.list_images(source)
  stamp = fingerprint(config)
  size = G.config["size"]
  photo_entries, photo_failed = entries, []
  if config.data.align:
    from dhr_jax import photos
    entries, photo_failed = photos.prepare(
        photo_entries, workdir, size, face_models, config.data.faces,
        min_size=int(config.data.min_face_size))
    for f in photo_failed:
      logging.warning("%s: %s", f["file"], f["reason"])
  b = pipeline.padded_size(None, config.batch_size, models.n_devices)
  if b != int(config.batch_size):
    logging.info("batch size %d rounded up to %d (a multiple of %d devices)",
                 config.batch_size, b, models.n_devices)
  logging.info("%d input(s) from %s, batches of %d on %d device(s)",
               len(entries), config.data.input, b, models.n_devices)

  def complete(name):
    marker = io.read_marker(os.path.join(workdir, io.output_name(name)))
    return marker is not None and marker.get("fingerprint") == stamp

  failed = list(photo_failed)
  skipped = sum(complete(n) for n, _ in entries)
  if skipped:
    logging.info("%d image(s) already complete in %s; skipping them",
                 skipped, workdir)
  from tqdm import tqdm
  progress = tqdm(total=len(entries), initial=skipped, unit="img",
                  desc="DHR", dynamic_ncols=True)
  # Batches are fixed slices of the sorted inputs, so a resumed run computes
  # every image in the same batch as an uninterrupted one.
  for start in range(0, len(entries), b):
    chunk = entries[start:start + b]
    todo = [n for n, _ in chunk if not complete(n)]
    if not todo:
      continue
    names, images = [], []
    for name, path in chunk:
      try:
        images.append(io.load_image(path, size))
        names.append(name)
      except io.ImageError as e:
        logging.warning("skipping %s", e)
        failed.append(dict(name=name, file=path, reason=_short(
            str(e).replace(path + ": ", ""))))
        progress.update(1)
    if not any(n in todo for n in names):
      continue
    t0 = time.perf_counter()
    landmarks, notes = None, {}
    if models.parser is not None:
      from dhr_jax import photos
      landmarks, why = photos.parser_landmarks(face_models, np.stack(images))
      notes = {n: dict(landmarks=w or "detected") for n, w in zip(names, why)}
    try:
      results, times = pipeline.run_batch(
          models, config, np.stack(images), names, edits=edits,
          ground_truth=gt, refine_fn=refine_fn, landmarks=landmarks)
    except pipeline.PipelineError as e:
      raise UserError(str(e)) from None
    except Exception as e:  # one bad batch must not end the run
      logging.exception("batch %s failed", names)
      for name in names:
        if name in todo:
          failed.append(dict(name=name, file=dict(chunk)[name],
                             reason=_short(f"{type(e).__name__}: {e}")))
          progress.update(1)
      continue
    share = (time.perf_counter() - t0) / len(names)
    for r in results:
      if r.name not in todo:
        continue  # complete from an earlier run, recomputed for its batch
      if not r.ok:
        logging.warning("%s failed: %s", r.name, r.reason)
        failed.append(dict(name=r.name, file=dict(chunk)[r.name],
                           reason=r.reason))
      else:
        if face_models is not None:
          from dhr_jax import photos
          r.metrics.update(photos.identity_metrics(face_models, r.target,
                                                   r.image, r.edits))
        write_image(workdir, r, G, config, dict(chunk)[r.name], stamp, share,
                    notes.get(r.name))
      progress.update(1)
    progress.set_postfix({k: f"{v:.1f}s" for k, v in times.items()})
  progress.close()
  if config.data.align:
    from dhr_jax import photos
    failed_photos = {f["name"] for f in photo_failed}
    for name, path in photo_entries:
      if name not in failed_photos:
        photos.paste_photo(workdir, name, path, stamp)
    # Photos without a face count among the inputs of the outcome.
    entries = entries + [(f["name"], f["file"]) for f in photo_failed]
  return _finish(config, workdir, entries, failed, skipped, t_start, "run")


def _finish(config, workdir, entries, failed, skipped, t_start, mode):
  """metrics.csv and summary.json from every complete image; the outcome."""
  from dhr_jax import io
  from dhr_jax import pipeline
  stamp = fingerprint(config)
  rows = []
  for name, _ in entries:
    marker = io.read_marker(os.path.join(workdir, io.output_name(name)))
    if marker is not None and marker.get("fingerprint") == stamp:
      rows.append(dict(name=name, **marker["metrics"]))
  columns = ["name"] + list(pipeline.METRICS) + ["seconds"]
  extra = [c for c in pipeline.GT_METRICS if any(c in r for r in rows)]
  # id_dlib (the faces extra): inversion first, then each edit.
  ids = sorted({c for r in rows for c in r if c.startswith("id_dlib")},
               key=lambda c: (c != "id_dlib", c))
  columns += extra + ids
  io.write_csv(os.path.join(workdir, "metrics.csv"), rows, columns)
  means = {c: float(np.mean([r[c] for r in rows]))
           for c in columns[1:] if rows and all(c in r for r in rows)}
  import jax
  summary = dict(
      mode=mode, images=len(entries), done=len(rows), failed=failed,
      skipped_complete=skipped, means=means, config=config.to_dict(),
      versions=_versions(), devices=[str(d) for d in jax.devices()],
      seconds=time.time() - t_start, fingerprint=stamp)
  io.write_json(os.path.join(workdir, "summary.json"), summary)
  if len(rows) <= 20:
    _print_table(rows, columns)
  print("mean   " + "  ".join(f"{k}={v:.4g}" for k, v in means.items()))
  if failed:
    return Outcome([r["name"] for r in rows], failed, skipped, 1,
                   _failure_line(len(entries), rows, failed))
  return Outcome([r["name"] for r in rows], [], skipped, 0,
                 f"DHR: {len(rows)} of {len(entries)} images done in "
                 f"{workdir}")


def edit(config, workdir):
  """Renders config.edit again for every finished image of `workdir`."""
  from dhr_jax import checkpoint
  from dhr_jax import io
  from dhr_jax import pipeline
  from dhr_jax import refine
  t_start = time.time()
  workdir = os.path.abspath(workdir)
  if not os.path.isdir(workdir):
    raise UserError(f"workdir {workdir} does not exist; run without "
                    "--mode=edit first")
  G = load_generator(config)
  edits = build_edits(config.edit, G)
  if not edits:
    raise UserError("no edits configured: set --config.edit.directions="
                    "name=path.npy, --config.edit.ganspace=... or "
                    "--config.edit.random_direction_seed=0")
  entries = []
  photo_dirs = []
  for name in sorted(os.listdir(workdir)):
    directory = os.path.join(workdir, name)
    if not os.path.isdir(directory):
      continue
    # Aligned photos keep their faces one level down (OUT/<photo>/face<k>).
    candidates = [directory]
    if os.path.isfile(os.path.join(directory, "faces.json")):
      photo_dirs.append(directory)
      candidates = [os.path.join(directory, f)
                    for f in sorted(os.listdir(directory))
                    if f.startswith("face") and
                    os.path.isdir(os.path.join(directory, f))]
    for d in candidates:
      marker = io.read_marker(d, optional=("edits/", "grid.png"))
      if marker is not None:
        entries.append((marker["name"], d, marker))
  if not entries:
    raise UserError(f"{workdir} holds no finished images (no {io.MARKER}); "
                    "run without --mode=edit first")
  failed = []
  from tqdm import tqdm
  for name, directory, marker in tqdm(entries, unit="img", desc="edit"):
    try:
      refined = refine.load_refined(os.path.join(directory, "refined"), G)
    except (checkpoint.CheckpointError, OSError, KeyError, ValueError) as e:
      failed.append(dict(name=name, file=directory, reason=_short(e)))
      continue
    rendered = pipeline.render_edits(G, pipeline.to_host(refined), edits)
    files = [f for f in marker["files"]
             if not f.startswith("edits/") and f != "grid.png"]
    tiles = _write_edits(directory, rendered, files)
    from PIL import Image
    read = lambda f: np.asarray(Image.open(os.path.join(directory, f)))
    _write_png(directory, "grid.png",
               _grid(read("input.png"), read("inversion.png"),
                     read("mask.png"), tiles), files)
    marker.update(edits=list(rendered), files=files)
    io.write_json(os.path.join(directory, io.MARKER), marker)
  if photo_dirs:
    from dhr_jax import photos
    for directory in photo_dirs:
      with open(os.path.join(directory, "faces.json")) as f:
        source = json.load(f)["photo"]
      try:
        photos.paste_photo(workdir, os.path.basename(directory), source)
      except io.ImageError as e:
        failed.append(dict(name=os.path.basename(directory), file=source,
                           reason=_short(e)))
  names = [(n, d) for n, d, _ in entries]
  print(f"re-edited {len(entries) - len(failed)} image(s) in {workdir}")
  if failed:
    return Outcome([n for n, _ in names], failed, 0, 1,
                   _failure_line(len(entries), names, failed))
  return Outcome([n for n, _ in names], [], 0, 0,
                 f"DHR: re-edited {len(entries)} images in {workdir}")


def _quiet_orbax(record):
  # orbax logs every checkpoint step at INFO; one refined/ per image would
  # bury the run's own messages.
  import logging as std_logging  # absl's WARNING constant is not the level
  return (record.levelno >= std_logging.WARNING
          or "orbax" not in record.pathname)


def main(argv):
  logging.get_absl_logger().addFilter(_quiet_orbax)
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  config = _CONFIG.value
  if config is None:
    print("error: --config is required (e.g. --config=configs/dhr.py)",
          file=sys.stderr)
    return 2
  if not _WORKDIR.value:
    print("error: --workdir is required", file=sys.stderr)
    return 2
  try:
    if _MODE.value == "edit":
      outcome = edit(config, _WORKDIR.value)
    else:
      outcome = run(config, _WORKDIR.value)
  except UserError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  print(outcome.message, file=sys.stderr if outcome.status else sys.stdout)
  return outcome.status


if __name__ == "__main__":
  app.run(main)
