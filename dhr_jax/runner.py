"""A DHR run over a folder of images, as `run.py` drives it.

Everything between the parsed config and the exit status: settings checked
and models loaded before anything is created, the workdir's layout
(OUT/<name>/ per image, its done.json marker last, so a rerun resumes where
a killed one stopped; with config.data.align, OUT/<photo>/face<k>/ per face
and the results pasted back into the photo, see `dhr_jax.photos`), the workdir lock, progress, metrics.csv /
summary.json / index.html, and the edit pass (`--mode=edit`) that
re-renders edits of a finished workdir from its saved refined/ states.

Bad settings raise `UserError` (one line for the user, exit status 2).
"""
import contextlib
import dataclasses
import hashlib
import json
import logging as std_logging
import os
import platform
import shutil
import sys
import time

from absl import flags
from absl import logging
import flax
import jax
# The coordination service's client (key-value store, barriers) has no
# public alias; jax's own checkpointing uses it the same way.
from jax._src import distributed as jax_distributed
import jax.numpy as jnp
import jaxlib
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp
from PIL import Image
from tqdm import tqdm

import dhr_jax
from dhr_jax import checkpoint
from dhr_jax import config_files
from dhr_jax import editing
from dhr_jax import faces
from dhr_jax import identity
from dhr_jax import io
from dhr_jax import lpips
from dhr_jax import photos
from dhr_jax import pipeline
from dhr_jax import refine
from dhr_jax import segmentation
from dhr_jax.models import curricularface
from dhr_jax.models import e4e
from dhr_jax.models import farl
from dhr_jax.models import stylegan2


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
_ID_CMD = ("python -m converters.curricularface --src "
           "CurricularFace_Backbone.pth --dst {path}")
_FARL_SOURCE = ("(facer's FaRL celebm/448 parser, github.com/FacePerceiver/"
                "facer release models-v1)")
_NO_PARSER_HINT = ("; or run without a parser, not the paper's DSS: "
                   "--config.model.parser=none")
# config.model.parser values meaning "no parser" ("" is the old spelling).
NO_PARSER = ("none", "")


def parser_path(config):
  """The face parser's checkpoint path of `config.model.parser`, or None
  when the run goes without one ('none', or the old '')."""
  value = config.model.parser.strip()
  return None if value.lower() in NO_PARSER else value


def _thresholds_in_words(c):
  if c.adaptive:
    return "Otsu's threshold of each image's superpixel scores"
  return f"one threshold ({c.single_threshold:g}) for every superpixel"


def dss_description(config):
  """What DSS does under `config`, in words (summary.json's "dss")."""
  c = config.dss
  # Named variants of the official DSS that are switched on.
  variants = "".join(
      f", dss.{k}={c[k]!r}" for k, allowed in segmentation.CHOICES.items()
      if c.get(k, allowed[0]) != allowed[0])
  if parser_path(config) is None:
    return (f"no parser: {_thresholds_in_words(c)}, no parsing mask"
            f"{variants}; not the paper's DSS")
  if c.adaptive:
    return (f"FaRL parser: parsing mask, but {_thresholds_in_words(c)} "
            f"instead of one per parsing class{variants}; not the paper's "
            "DSS")
  if variants:
    return (f"FaRL parser, a threshold per parsing class and the parsing "
            f"mask{variants}; not the paper's DSS")
  return ("the paper's: FaRL parser, a threshold per parsing class and the "
          "parsing mask")


def no_parser_warning(config):
  """The one line a run without a parser starts with."""
  return (f"config.model.parser={config.model.parser!r}: DSS without a face "
          f"parser uses {_thresholds_in_words(config.dss)} and no parsing "
          "mask; not the paper's DSS (convert the parser: "
          f"{_FARL_CMD.format(path='ckpt/farl')})")


def landmarks_description(config, face_models):
  """Where the parser's landmarks come from (summary.json's
  "parser_landmarks"); None without a parser."""
  if parser_path(config) is None:
    return None
  if face_models is None:
    return ("canonical FFHQ template (the faces extra is not installed); "
            "the official code detects faces with RetinaFace")
  if config.data.get("align", False):
    return ("dlib's landmarks of each aligned face (the FFHQ template "
            "where the detector misses it)")
  return ("dlib HOG detector, top-scoring face (RetinaFace's weights are "
          "not to be had offline); no face: no parsing mask, class 0")


def load_generator(config):
  """The generator of `config.model` (a converted checkpoint or the stand-in)."""
  m = config.model
  if m.checkpoint == "stand-in":
    s = m.stand_in
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


def load_id_network(config, face_models):
  """The paper's ID network of config.model.id_network (None when unset);
  its metric needs dlib's landmarks (`face_models`)."""
  path = config.model.get("id_network", "")
  if not path:
    return None
  if not os.path.exists(path):
    raise _missing(path, "ID network checkpoint", _ID_CMD.format(path=path))
  if face_models is None:
    raise UserError("config.model.id_network: the ID metric finds its "
                    "landmarks with dlib; pip install 'dhr_jax[faces]'")
  try:
    return curricularface.load_id_network(path)
  except checkpoint.CheckpointError as e:
    raise UserError(f"{e} (convert with: {_ID_CMD.format(path=path)})"
                    ) from None


def load_models(config, mesh=None):
  """Loads every model the config needs; refuses an encoder whose codes do
  not fit the generator before anything else is loaded."""
  m = config.model
  method = config.embedding.method
  _one_of("embedding.method", method, pipeline.EMBEDDINGS)
  # First: a wrong ID network path is found before the big models load.
  id_network = load_id_network(config, _face_models(config))
  G = load_generator(config)
  encoder = parser = None
  if method == "e4e":
    if m.checkpoint == "stand-in" or not os.path.exists(m.checkpoint):
      raise _missing(m.checkpoint, "e4e checkpoint",
                     _E4E_CMD.format(path=m.checkpoint or "DIR"))
    try:
      encoder = e4e.load_encoder(m.checkpoint)
    except checkpoint.CheckpointError as e:
      raise UserError(f"{e} (convert with: "
                      f"{_E4E_CMD.format(path=m.checkpoint)})") from None
    try:
      pipeline.check_compatible(G, encoder)
    except pipeline.PipelineError as e:
      raise UserError(f"model.generator {m.generator or m.checkpoint!r} does "
                      f"not fit model.checkpoint {m.checkpoint!r}: {e}"
                      ) from None
  path = parser_path(config)
  if path is not None:
    if not os.path.exists(path):
      cmd = _FARL_CMD.format(path=path)
      raise UserError(f"{_missing(path, 'parser checkpoint', cmd)} "
                      f"{_FARL_SOURCE}{_NO_PARSER_HINT}")
    try:
      parser = farl.load_parser(path)
    except checkpoint.CheckpointError as e:
      raise UserError(f"{e} (convert with: "
                      f"{_FARL_CMD.format(path=path)}){_NO_PARSER_HINT}"
                      ) from None
  elif m.checkpoint != "stand-in":
    # The stand-in generator (the demo) makes no faces: nothing to parse.
    logging.warning("%s", no_parser_warning(config))
  try:
    vgg, alex = lpips.load("vgg"), lpips.load("alex")
  except lpips.LPIPSWeightsError as e:
    raise UserError(str(e)) from None
  return pipeline.prepare_models(
      G, vgg, alex, encoder=encoder, parser=parser, id_network=id_network,
      seed=int(config.seed), n_mean_latent=int(config.embedding.n_mean_latent),
      mesh=mesh)


def edit_directions(edit_config, G):
  """config.edit's InterFaceGAN directions → [(name, direction)]: those of
  edit.directions ("name=path,..."), then the seeded 'random' one when
  edit.random_direction_seed ≥ 0. Raises UserError for a bad entry."""
  e = edit_config
  out = []
  try:
    for item in str(e.directions).split(","):
      if not item.strip():
        continue
      if "=" not in item:
        raise UserError(f"config.edit.directions: expected name=path, got "
                        f"{item.strip()!r}")
      name, path = (x.strip() for x in item.split("=", 1))
      out.append((name, editing.load_direction(path)))
  except editing.EditError as err:
    raise UserError(f"config.edit: {err}") from None
  if int(e.random_direction_seed) >= 0:
    out.append(("random", pipeline.random_direction(
        int(e.random_direction_seed), G.config["style_dim"])))
  return out


def build_edits(edit_config, G):
  """config.edit → [EditSpec]: the InterFaceGAN directions, the GANSpace
  edits, then the random direction (`edit_directions`)."""
  e = edit_config
  directions = edit_directions(e, G)
  n_given = len(directions) - (int(e.random_direction_seed) >= 0)
  try:
    strengths = editing.parse_strengths(e.strengths)
    layers = editing.parse_layers(e.layers)
    out = [pipeline.interfacegan(name, n, strengths, layers)
           for name, n in directions[:n_given]]
    if e.ganspace:
      pcs = editing.load_ganspace(e.ganspace)
      name = os.path.splitext(os.path.basename(e.ganspace))[0]
      out.append(pipeline.ganspace(
          name, pcs, editing.parse_ganspace_edits(e.ganspace_edits),
          e.ganspace_mode))
    elif e.ganspace_edits:
      raise UserError("config.edit.ganspace_edits needs config.edit.ganspace "
                      "(the components file)")
    out += [pipeline.interfacegan(name, n, strengths, layers)
            for name, n in directions[n_given:]]
  except editing.EditError as err:
    raise UserError(f"config.edit: {err}") from None
  labels = [l for spec in out for l in spec.labels]
  if len(set(labels)) != len(labels):
    raise UserError(f"config.edit gives two edits the same name: {labels}")
  # Shapes are checked now, on a dummy code, not after an hour of refinement.
  probe = jnp.zeros((1, G.n_latent, G.config["style_dim"]), jnp.float32)
  for spec in out:
    try:
      spec.fn(probe)
    except editing.EditError as err:
      raise UserError(f"config.edit ({spec.name}): {err}") from None
  return out


# --------------------------------------------------------------------------
# Settings


def _one_of(key, value, allowed):
  if value not in allowed:
    raise UserError(f"config.{key} must be one of "
                    f"{', '.join(map(str, allowed))}; got {value!r}")


def _at_least(key, value, low):
  if value < low:
    raise UserError(f"config.{key} must be ≥ {low}; got {value}")


def validate_config(config):
  """Refuses unusable settings before anything is loaded or created."""
  _at_least("batch_size", int(config.batch_size), 1)
  e = config.embedding
  _one_of("embedding.method", e.method, pipeline.EMBEDDINGS)
  _one_of("embedding.space", e.space, ("w", "w+"))
  _one_of("embedding.init", e.get("init", "latent_avg"),
          pipeline.EMBEDDING_INITS)
  _at_least("embedding.steps", int(e.steps), 0)
  _at_least("embedding.n_mean_latent", int(e.n_mean_latent), 1)
  _at_least("dss.coarse_steps", int(config.dss.coarse_steps), 1)
  _at_least("dss.n_segments", int(config.dss.n_segments), 1)
  for key, allowed in segmentation.CHOICES.items():
    if key in config.dss:
      _one_of(f"dss.{key}", config.dss[key], allowed)
  r = config.refine
  _one_of("refine.mode", r.mode, refine.MODES)
  _at_least("refine.feature_steps", int(r.feature_steps), 1)
  _at_least("refine.weight_steps", int(r.weight_steps), 0)
  if int(r.weight_steps) > int(r.feature_steps):
    raise UserError(
        f"config.refine.weight_steps ({r.weight_steps}) must be ≤ "
        f"config.refine.feature_steps ({r.feature_steps}): the weights are "
        "refined during the first weight_steps of the feature steps")
  _one_of("edit.ganspace_mode", config.edit.ganspace_mode, ("add", "set"))
  if config.data.input == "synthetic" and "synthetic" not in config.data:
    raise UserError("config.data.input='synthetic' needs config.data."
                    "synthetic (see configs/demo.py)")
  if config.data.get("align", False):
    if config.data.input == "synthetic":
      raise UserError("config.data.align=True aligns faces in photos: set "
                      "--config.data.input=PHOTO_OR_DIR")
    _one_of("data.faces", config.data.faces, ("largest", "all"))
    _at_least("data.min_face_size", int(config.data.min_face_size), 0)


def _face_models(config):
  """dlib's models when the `faces` extra is installed, else None (then no
  id_dlib metrics); config.data.align requires them."""
  try:
    return photos.face_models(required=bool(config.data.get("align", False)))
  except faces.FacesUnavailable as e:
    raise UserError(f"config.data.align=True: {e}") from None


def _check_feature_idx(config, G):
  try:
    refine.refine_spec(G, int(config.refine.feature_idx), config.refine.mode)
  except ValueError as e:
    raise UserError(f"config.refine.feature_idx: {e}") from None


# --------------------------------------------------------------------------
# Inputs


def _synthetic_inputs(config, workdir, G):
  """Writes the demo's synthetic targets to OUT/inputs (once) → (dir, gt)."""
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

  Edits (re-done by --mode=edit), the ID network (a metric only) and the
  batch size (it changes results by float rounding only) are left out, the
  spellings of "no parser" are one;
  a marker with another fingerprint is stale.
  """
  d = config.to_dict()
  d.pop("edit", None)
  d.pop("batch_size", None)
  # The ID network adds a metric column; it changes no image.
  d["model"].pop("id_network", None)
  if parser_path(config) is None:
    d["model"]["parser"] = ""  # 'none' and '' are the same run
  return hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()
                        ).hexdigest()[:16]


# --------------------------------------------------------------------------
# Writing one image


def _write_png(directory, rel, array, files):
  io.write_bytes(os.path.join(directory, rel), io.png_bytes(array))
  files.append(rel)


def _grid(input_u8, inversion_u8, mask_u8, edit_tiles, edit_names):
  """grid.png: the columns titled, tiles scaled up for small generators."""
  return io.titled_grid([input_u8, inversion_u8, mask_u8]
                        + list(edit_tiles.values()),
                        io.grid_titles(list(edit_tiles), edit_names))


def _write_edits(directory, rendered, files):
  """edits/<label>.png for every rendered edit → {label: uint8 tile}.

  Other files in edits/ stay: an edit pass adds to the edits of the run.
  """
  tiles = {}
  for label, img in rendered.items():
    u8 = io.to_uint8(img)
    _write_png(directory, f"edits/{label}.png", u8, files)
    tiles[label] = u8
  return tiles


def write_image(workdir, r, G, config, source, stamp, seconds_before=0.0,
                edit_names=(), notes=None):
  """All outputs of one successful image, the marker last.

  seconds_before: this image's share of the batch's compute time; the
  marker records it plus the time spent writing. edit_names: the edits'
  names, to title the grid's columns 'name strength'. notes: more entries
  for the marker (e.g. where the parser's landmarks came from).
  """
  t0 = time.perf_counter()
  directory = os.path.join(workdir, io.output_name(r.name))
  if os.path.isdir(directory):
    shutil.rmtree(directory)  # leftovers of an interrupted attempt
  os.makedirs(directory)
  files = []
  refine.save_refined(os.path.join(directory, "refined"), r.refined, G,
                      overwrite=True)
  files += ["refined/arrays.npz", "refined/config.json"]
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
    _write_png(directory, "error_map.png", io.error_figure(r.error_map),
               files)
    if r.parsing is not None:
      _write_png(directory, "parsing.png", io.parsing_picture(r.parsing),
                 files)
  tiles = _write_edits(directory, r.edits, files)
  _write_png(directory, "grid.png", _grid(inp, inv, mask, tiles, edit_names),
             files)
  seconds = seconds_before + time.perf_counter() - t0
  marker = dict(name=r.name, source=source, fingerprint=stamp,
                metrics=dict(r.metrics, seconds=seconds),
                edits=list(r.edits), edit_names=list(edit_names),
                files=files, **(notes or {}))
  path = os.path.join(directory, io.MARKER)
  io.write_json(path, marker)
  return marker


# --------------------------------------------------------------------------
# Run


def _versions():
  v = dict(dhr_jax=dhr_jax.__version__, jax=jax.__version__,
           jaxlib=jaxlib.__version__, flax=flax.__version__,
           optax=optax.__version__, numpy=np.__version__,
           python=platform.python_version(), platform=platform.platform())
  v["orbax"] = getattr(ocp, "__version__", "?")
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


def _cell(v):
  return f"{v:.4g}" if isinstance(v, float) else str(v)


def _print_table(rows, columns, file=None):
  """Rows under their column names, each column as wide as its widest cell."""
  if not rows:
    return
  file = file or sys.stdout
  cells = [[_cell(r.get(c, "")) for c in columns] for r in rows]
  widths = [max([len(c)] + [len(row[i]) for row in cells])
            for i, c in enumerate(columns)]
  print("  ".join(c.ljust(w) for c, w in zip(columns, widths)).rstrip(),
        file=file)
  for row in cells:
    print("  ".join(v.ljust(w) for v, w in zip(row, widths)).rstrip(),
          file=file)


# --------------------------------------------------------------------------
# Several processes (hosts)

DISTRIBUTED_ENV = ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES",
                   "JAX_PROCESS_ID")
# How long a process waits for its siblings (the slowest one's share of the
# images, and the models' loading).
_SIBLING_TIMEOUT_MS = 24 * 3600 * 1000


def init_distributed(environ=None):
  """Joins a multi-process run when JAX_COORDINATOR_ADDRESS is set.

  JAX_COORDINATOR_ADDRESS=host:port, JAX_NUM_PROCESSES=N and
  JAX_PROCESS_ID=k (0 ≤ k < N, process 0 runs the coordinator) are passed to
  `jax.distributed.initialize`, before anything else uses JAX. Returns
  whether it did; bad values are a UserError.
  """
  environ = os.environ if environ is None else environ
  if not environ.get("JAX_COORDINATOR_ADDRESS"):
    return False
  try:
    count = int(environ.get("JAX_NUM_PROCESSES", ""))
    index = int(environ.get("JAX_PROCESS_ID", ""))
  except ValueError:
    raise UserError("JAX_COORDINATOR_ADDRESS is set, so JAX_NUM_PROCESSES "
                    "and JAX_PROCESS_ID must be integers (got "
                    f"{environ.get('JAX_NUM_PROCESSES')!r}, "
                    f"{environ.get('JAX_PROCESS_ID')!r})") from None
  if count < 1 or not 0 <= index < count:
    raise UserError(f"JAX_PROCESS_ID={index} must be in [0, "
                    f"JAX_NUM_PROCESSES={count})")
  jax.distributed.initialize(environ["JAX_COORDINATOR_ADDRESS"], count, index)
  return True


def _coordination():
  """The coordination service's client (None in a single-process run).

  The processes share no arrays: they exchange small JSON values and meet
  at barriers through it, which needs no cross-process collectives (not
  set up for CPU by default).
  """
  if jax.process_count() == 1:
    return None
  return jax_distributed.global_state.client


@contextlib.contextmanager
def _lock(workdir):
  """Holds the workdir's lock; another run holding it is a UserError.

  In a run of several processes, process 0 holds `.lock` (which excludes
  every other run, single- or multi-process) and process k `.lock.<k>`;
  process k goes on only once process 0 has said it holds `.lock`.
  """
  client, k = _coordination(), jax.process_index()
  try:
    lock = io.WorkdirLock(
        workdir, io.WorkdirLock.NAME + (f".{k}" if k else "")).acquire()
  except io.WorkdirBusy as e:
    if client is not None and k == 0:
      client.key_value_set("dhr/lock", f"error: {e}")
    raise UserError(str(e)) from None
  try:
    if client is not None:
      if k == 0:
        client.key_value_set("dhr/lock", "ok")
      else:
        said = client.blocking_key_value_get("dhr/lock", _SIBLING_TIMEOUT_MS)
        if said != "ok":
          raise UserError(f"process 0 could not lock {workdir}: "
                          + said.removeprefix("error: "))
    yield lock
  finally:
    lock.release()


class Progress:
  """The images bar, with the running batch's stage beside it (run and
  compare).

  Stages come from `pipeline.run_batch` (`compare.compare_batch`), the
  steps of the compiled loops from XLA's callback thread; the bar is
  redrawn at most every `interval` seconds (and on every stage change) so
  that the compiled loops never wait on it.
  """

  def __init__(self, total, initial, interval=0.5, listener=None,
               desc="DHR"):
    self.listener = listener
    self.bar = tqdm(total=total, initial=initial, unit="img", desc=desc,
                    dynamic_ncols=True)
    self.batch = ""
    self.stage = ""
    self.interval = interval
    self._shown = 0.0

  def start_batch(self, index, count, names):
    self.batch = f"batch {index}/{count} ({', '.join(names)})"

  def __call__(self, stage):
    if self.listener is not None:
      self.listener(stage)  # every stage and step, unthrottled
    head, _, count = stage.partition(" step ")
    k, _, n = count.partition("/")
    now = time.monotonic()
    # Within a stage, steps are drawn at most every `interval`, except the
    # first and the last.
    if (head == self.stage.partition(" step ")[0] and k not in ("1", n)
        and now - self._shown < self.interval):
      return
    self.stage, self._shown = stage, now
    self.bar.set_postfix_str(f"{self.batch}: {stage}", refresh=True)

  def update(self, n=1):
    self.bar.update(n)

  def close(self):
    self.bar.set_postfix_str("", refresh=False)
    self.bar.close()


def run(config, workdir, *, models=None, progress=None):
  """Inverts, refines and edits every input of `config` into `workdir`.

  Every setting, the inputs, the models and the workdir's parent are checked
  before anything is created; the workdir is locked while the run writes.
  models: `load_models(config, ...)` already loaded (the app loads them
  once for every upload). progress: optional `progress(stage)`, told every
  stage and refinement step of `pipeline.run_batch` as the bar is.
  """
  t_start = time.time()
  workdir = os.path.abspath(workdir)
  validate_config(config)
  try:
    io.check_creatable(workdir)
  except io.WorkdirError as e:
    raise UserError(str(e)) from None
  entries = None
  if config.data.input != "synthetic":
    try:
      entries = io.list_images(config.data.input)
    except io.ImageError as e:
      raise UserError(str(e)) from None
  face_models = _face_models(config)
  with contextlib.ExitStack() as held:
    # A workdir that exists may be another run's: refuse now, not after the
    # models are loaded. A new one is locked as soon as it is made.
    if os.path.isdir(workdir):
      held.enter_context(_lock(workdir))
    if models is None:
      models = load_models(config, pipeline.make_mesh())
    _check_feature_idx(config, models.G)
    edits = build_edits(config.edit, models.G)
    if not os.path.isdir(workdir):
      try:
        io.check_writable(workdir)
      except io.WorkdirError as e:
        raise UserError(str(e)) from None
      held.enter_context(_lock(workdir))
    return _run_batches(config, workdir, entries, models, edits, t_start,
                        face_models, progress)


def _run_batches(config, workdir, entries, models, edits, t_start,
                 face_models=None, listener=None):
  G = models.G
  edit_names = [e.name for e in edits]
  gt = None
  source = config.data.input
  if source == "synthetic":
    source, gt = _synthetic_inputs(config, workdir, G)
    entries = io.list_images(source)
  stamp = fingerprint(config)
  size = G.config["size"]
  photo_entries, photo_failed = entries, []
  if config.data.get("align", False):
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
  process, n_processes = jax.process_index(), jax.process_count()
  if n_processes > 1 and (jax.device_count()
                          != n_processes * jax.local_device_count()):
    # Each process cuts the batches itself, from its own device count.
    raise UserError(f"every process needs the same number of devices; this "
                    f"one has {jax.local_device_count()} of the "
                    f"{jax.device_count()} in {n_processes} processes")
  # Batches are fixed slices of the sorted inputs, and process k takes every
  # n-th batch: an image is computed in the same batch, at the same
  # position, whether the run is resumed or split over processes. Which
  # images share a batch changes the float rounding of batched operations
  # (an LPIPS metric moved by 1e-8 when an image changed partners), so this
  # is what keeps every output the same bytes.
  chunks = [entries[start:start + b] for start in range(0, len(entries), b)]
  numbered = list(enumerate(chunks, 1))[process::n_processes]
  mine = [e for _, chunk in numbered for e in chunk]
  if n_processes > 1:
    if len(chunks) < n_processes:
      logging.warning("%d batch(es) for %d processes: %d process(es) have "
                      "nothing to do (lower --config.batch_size to share "
                      "the work)", len(chunks), n_processes,
                      n_processes - len(chunks))
    skipped = sum(complete(n) for n, _ in mine)
    logging.info("process %d of %d: %d of the %d input(s)", process, n_processes,
                 len(mine), len(entries))
  progress = Progress(len(mine), skipped, listener=listener)
  n_batches = len(chunks)
  for number, chunk in numbered:
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
    progress.start_batch(number, n_batches, todo)
    t0 = time.perf_counter()
    landmarks, notes = None, {}
    if models.parser is not None:
      landmarks, why = photos.parser_landmarks(
          face_models, np.stack(images),
          aligned_crops=bool(config.data.get("align", False)))
      notes = {n: dict(landmarks=w or "detected") for n, w in zip(names, why)}
    try:
      results, times = pipeline.run_batch(
          models, config, np.stack(images), names, edits=edits,
          ground_truth=gt, progress=progress, landmarks=landmarks)
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
    progress("writing")
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
          r.metrics.update(photos.identity_metrics(face_models, r.target,
                                                   r.image, r.edits))
        if models.id_network is not None:
          r.metrics.update(identity.metrics(models.id_network, face_models,
                                            r.target, r.image))
        write_image(workdir, r, G, config, dict(chunk)[r.name], stamp, share,
                    edit_names, notes.get(r.name))
      progress.update(1)
    if process == 0:  # one writer; it shows every process's finished images
      _write_index(workdir, entries, failed, stamp)
    logging.info("batch %s: %s", ", ".join(todo),
                 ", ".join(f"{k} {v:.1f} s" for k, v in times.items()))
  progress.close()
  if photo_entries is not entries:
    failed_photos = {f["name"] for f in photo_failed}
    for name, path in photo_entries:
      if name not in failed_photos:
        photos.paste_photo(workdir, name, path, stamp)
    # Photos without a face count among the inputs of the outcome.
    entries = entries + [(f["name"], f["file"]) for f in photo_failed]
  client = _coordination()
  if client is not None:
    # Each process's failures and skips reach process 0, which writes the
    # run's files once every process has finished its share.
    client.key_value_set(f"dhr/finished/{process}",
                         json.dumps(dict(failed=failed, skipped=skipped)))
    client.wait_at_barrier("dhr/finished", _SIBLING_TIMEOUT_MS)
    if process != 0:
      done = [r["name"] for r in _rows(workdir, mine, stamp)]
      return Outcome(done, failed, skipped, 1 if failed else 0,
                     f"DHR process {process}: {len(done)} of its "
                     f"{len(mine)} images done in {workdir}, {len(failed)} "
                     "failed; process 0 writes the summary")
    failed, skipped = [], 0
    for j in range(n_processes):
      share = json.loads(client.blocking_key_value_get(
          f"dhr/finished/{j}", _SIBLING_TIMEOUT_MS))
      failed += share["failed"]
      skipped += share["skipped"]
    order = {name: i for i, (name, _) in enumerate(entries)}
    failed.sort(key=lambda f: order.get(f["name"], len(order)))
  return _finish(config, workdir, entries, failed, skipped, t_start, "run",
                 face_models)


def _columns(rows):
  columns = ["name"] + list(pipeline.METRICS) + ["seconds"]
  # id_dlib (the faces extra): inversion first, then each edit; then the
  # paper's ID metric (config.model.id_network).
  ids = sorted({c for r in rows for c in r if c.startswith("id_dlib")},
               key=lambda c: (c != "id_dlib", c))
  ids += [identity.COLUMN] * any(identity.COLUMN in r for r in rows)
  return columns + [c for c in pipeline.GT_METRICS
                    if any(c in r for r in rows)] + ids


def _rows(workdir, entries, stamp):
  """A metrics row for every complete image of `entries`, in their order."""
  rows = []
  for name, _ in entries:
    marker = io.read_marker(os.path.join(workdir, io.output_name(name)))
    if marker is not None and marker.get("fingerprint") == stamp:
      rows.append(dict(name=name, **marker["metrics"]))
  return rows


def _write_index(workdir, entries, failed, stamp, rows=None):
  rows = _rows(workdir, entries, stamp) if rows is None else rows
  io.write_index(workdir, [dict(r, dir=io.output_name(r["name"]))
                           for r in rows], _columns(rows), failed)


def _finish(config, workdir, entries, failed, skipped, t_start, mode,
            face_models=None):
  """metrics.csv, summary.json and index.html from every complete image;
  the outcome. face_models: dlib's, if the run had them (the parser's
  landmarks came from them)."""
  stamp = fingerprint(config)
  rows = _rows(workdir, entries, stamp)
  columns = _columns(rows)
  io.write_csv(os.path.join(workdir, "metrics.csv"), rows, columns)
  means = {c: float(np.mean([r[c] for r in rows]))
           for c in columns[1:] if rows and all(c in r for r in rows)}
  summary = dict(
      mode=mode, images=len(entries), done=len(rows), failed=failed,
      skipped_complete=skipped, means=means, config=config.to_dict(),
      versions=_versions(), devices=[str(d) for d in jax.devices()],
      seconds=time.time() - t_start, fingerprint=stamp,
      dss=dss_description(config))
  landmarks = landmarks_description(config, face_models)
  if landmarks is not None:
    summary["parser_landmarks"] = landmarks
  if jax.process_count() > 1:
    summary["processes"] = jax.process_count()
  io.write_json(os.path.join(workdir, "summary.json"), summary)
  _write_index(workdir, entries, failed, stamp, rows)
  if len(rows) <= 20:
    _print_table(rows + ([dict(name="mean", **means)] if len(rows) > 1
                         else []), columns)
  elif means:
    print("mean  " + "  ".join(f"{k}={v:.4g}" for k, v in means.items()))
  if failed:
    return Outcome([r["name"] for r in rows], failed, skipped, 1,
                   _failure_line(len(entries), rows, failed))
  return Outcome([r["name"] for r in rows], [], skipped, 0,
                 f"DHR: {len(rows)} of {len(entries)} images done in "
                 f"{workdir} (see index.html)")


def edit(config, workdir):
  """Renders config.edit again for every finished image of `workdir`,
  beside its earlier edits (one of the same label is replaced)."""
  workdir = os.path.abspath(workdir)
  validate_config(config)
  if not os.path.isdir(workdir):
    raise UserError(f"workdir {workdir} does not exist; run without "
                    "--mode=edit first")
  with _lock(workdir):
    G = load_generator(config)
    edits = build_edits(config.edit, G)
    if not edits:
      raise UserError("no edits configured: set --config.edit.directions="
                      "name=path.npy, --config.edit.ganspace=... or "
                      "--config.edit.random_direction_seed=0")
    entries, photo_dirs = _finished(workdir)
    if not entries:
      raise UserError(f"{workdir} holds no finished images (no "
                      f"{io.MARKER}); run without --mode=edit first")
    return _edit_entries(workdir, G, edits, entries, photo_dirs)


def _finished(workdir):
  """[(name, folder, marker)] of every finished image of `workdir`, and the
  folders of aligned photos (their faces are one level down,
  OUT/<photo>/face<k>)."""
  entries, photo_dirs = [], []
  for name in sorted(os.listdir(workdir)):
    directory = os.path.join(workdir, name)
    if not os.path.isdir(directory):
      continue
    candidates = [directory]
    if os.path.isfile(os.path.join(directory, photos.FACES_FILE)):
      photo_dirs.append(directory)
      candidates = [os.path.join(directory, f)
                    for f in sorted(os.listdir(directory))
                    if f.startswith("face") and
                    os.path.isdir(os.path.join(directory, f))]
    for d in candidates:
      marker = io.read_marker(d, optional=("edits/", "grid.png"))
      if marker is not None:
        entries.append((marker["name"], d, marker))
  return entries, photo_dirs


def _edit_entries(workdir, G, edits, entries, photo_dirs=()):
  edit_names = [e.name for e in edits]
  done, failed = [], []
  for name, directory, marker in tqdm(entries, unit="img", desc="edit"):
    try:
      refined = refine.load_refined(os.path.join(directory, "refined"), G)
    except (checkpoint.CheckpointError, OSError, KeyError, ValueError) as e:
      failed.append(dict(name=name, file=directory, reason=_short(e)))
      continue
    rendered = pipeline.render_edits(G, refined, edits)
    read = lambda f: np.asarray(Image.open(os.path.join(directory, f)))
    # Earlier edits are kept (a new one of the same name replaces its file);
    # the grid and the marker list them first, then this pass's.
    earlier = [l for l in marker.get("edits", []) if l not in rendered and
               os.path.isfile(os.path.join(directory, "edits", f"{l}.png"))]
    files = [f for f in marker["files"]
             if not f.startswith("edits/") and f != "grid.png"]
    files += [f"edits/{l}.png" for l in earlier]
    tiles = {l: read(f"edits/{l}.png") for l in earlier}
    tiles.update(_write_edits(directory, rendered, files))
    names = list(dict.fromkeys(marker.get("edit_names", []) + edit_names))
    _write_png(directory, "grid.png",
               _grid(read("input.png"), read("inversion.png"),
                     read("mask.png"), tiles, names), files)
    marker.update(edits=list(tiles), edit_names=names, files=files)
    io.write_json(os.path.join(directory, io.MARKER), marker)
    done.append(name)
  for directory in photo_dirs:
    with open(os.path.join(directory, photos.FACES_FILE)) as f:
      source = json.load(f)["photo"]
    try:
      photos.paste_photo(workdir, os.path.basename(directory), source)
    except io.ImageError as e:
      failed.append(dict(name=os.path.basename(directory), file=source,
                         reason=_short(e)))
  rows = [dict(name=n, dir=os.path.relpath(d, workdir), **m["metrics"])
          for n, d, m in entries if n in done]
  io.write_index(workdir, rows, _columns(rows), failed)
  if failed:
    return Outcome(done, failed, 0, 1,
                   _failure_line(len(entries), done, failed))
  return Outcome(done, [], 0, 0,
                 f"DHR: re-edited {len(done)} of {len(entries)} images in "
                 f"{workdir} (see index.html)")


def _quiet_orbax(record):
  # orbax logs every checkpoint step at INFO, which would bury the run's own
  # messages among those of loading the models.
  return (record.levelno >= std_logging.WARNING
          or "orbax" not in record.pathname)



# --------------------------------------------------------------------------
# Command line


def _config_path(argv):
  """The --config file named in argv ('' when none), without ':args'; the
  last one given wins, as in absl."""
  path = ""
  for i, arg in enumerate(argv):
    if arg.startswith(("--config=", "-config=")):
      path = arg.split("=", 1)[1]
    elif arg in ("--config", "-config") and i + 1 < len(argv):
      path = argv[i + 1]
  return path.split(":", 1)[0]


def _load_config_file(path):
  """`get_config()` of a config file, or a UserError saying why not."""
  if not os.path.isfile(path):
    raise UserError(f"--config={path}: no such config file; use "
                    "configs/dhr.py (the paper's settings), configs/demo.py "
                    "(no weights) or a copy of one")
  try:
    return config_files.load_config(path)
  except Exception as e:  # whatever a broken config file raises
    raise UserError(f"--config={path}: cannot load it ({type(e).__name__}: "
                    f"{_short(e)})") from None


def _kind(value):
  if isinstance(value, bool):
    return "True or False"
  if isinstance(value, int):
    return "an integer"
  if isinstance(value, float):
    return "a number"
  if isinstance(value, (tuple, list)):
    return "a tuple, e.g. \"('a', 'b')\""
  return "a string" if isinstance(value, str) else type(value).__name__


def _override_error(config, argv, error):
  """The first --config.KEY=VALUE of argv that `config` refuses, explained."""
  for arg in argv:
    if not arg.startswith("--config."):
      continue
    key, _, value = arg[len("--config."):].partition("=")
    node, walked = config, "config"
    for part in key.split("."):
      if not isinstance(node, ml_collections.ConfigDict) or part not in node:
        have = (", ".join(sorted(node.keys()))
                if isinstance(node, ml_collections.ConfigDict) else
                f"nothing (it is {_kind(node)})")
        return (f"--config.{key}: no such setting; {walked} has {have}")
      node, walked = node[part], f"{walked}.{part}"
    if f"--config.{key}=" in str(error) or (
        f"--config.{key} " in str(error)):
      return (f"--config.{key}={value}: expected {_kind(node)} (the config "
              f"has {node!r})")
  return None


def parse_flags(argv, config_flag):
  """absl's flag parsing with one `error:` line and exit 2 on bad flags
  (absl would print a traceback or a FATAL line and exit 1); config_flag:
  the `--config` flag holder, whose file is loaded here."""
  try:
    rest = flags.FLAGS(argv)
    config = config_flag.value
    if config is not None:
      config.to_dict()  # a config file that failed to load raises here
  except (flags.Error, AttributeError, KeyError, OSError, TypeError,
          ValueError) as e:
    print(f"error: {explain_flag_error(argv, e)}", file=sys.stderr)
    sys.exit(2)
  return rest


def explain_flag_error(argv, error):
  """One line for a refused command line (unknown key, wrong type, missing
  config file, unknown flag): what was wrong and what is allowed."""
  path = _config_path(argv)
  if path or any(a.startswith("--config.") for a in argv):
    try:
      config = _load_config_file(path) if path else None
    except UserError as e:
      return str(e)
    if config is not None:
      line = _override_error(config, argv, error)
      if line:
        return line
  text = str(error).strip().splitlines()
  return text[0] if text else type(error).__name__


def main(config, workdir, mode="run", actions=None):
  """What `python run.py` does with its parsed flags → the exit status.

  mode 'run' or 'edit', or a key of `actions` ({mode: fn(config, workdir)
  → Outcome}, e.g. `dhr_jax.compare.run`, which imports this module); the
  outcome's one line ends the output (stderr when something failed), a
  UserError is one `error:` line and status 2.
  """
  logging.get_absl_logger().addFilter(_quiet_orbax)
  if config is None:
    print("error: --config is required (e.g. --config=configs/dhr.py)",
          file=sys.stderr)
    return 2
  if not workdir:
    print("error: --workdir is required", file=sys.stderr)
    return 2
  try:
    if init_distributed() and jax.process_count() > 1 and (
        mode != "run" or config.data.get("align", False)):
      # They write run-level files per photo or per image from one list.
      raise UserError(f"--mode={mode} and data.align run in one process; "
                      "unset JAX_COORDINATOR_ADDRESS")
    action = dict(run=run, edit=edit, **(actions or {}))[mode]
    outcome = action(config, workdir)
  except UserError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  print(outcome.message, file=sys.stderr if outcome.status else sys.stdout)
  return outcome.status
