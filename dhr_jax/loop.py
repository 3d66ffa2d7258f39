"""The run skeleton that `run`, `compare` and the browser editor share:

  set-up (`prepare`: settings, inputs, models, edits, the workdir and its
  lock) → batches of inputs (`BatchLoop`: DSS and the embedding once per
  batch when a method needs them, then every method of `methods.METHODS`
  asked for) → one
  `methods.ImageResult` per image and method, which the caller writes into
  the workdir (`dhr_jax.workdir`) → the `Outcome`.
"""
import contextlib
import dataclasses
import functools
import os
import sys
import time

from absl import logging
import jax
import numpy as np
from tqdm import tqdm

from dhr_jax import edits as edits_lib
from dhr_jax import files
from dhr_jax import identity
from dhr_jax import io
from dhr_jax import loading
from dhr_jax import lock
from dhr_jax import methods as methods_lib
from dhr_jax import photos
from dhr_jax import pipeline
from dhr_jax import settings
from dhr_jax import synthetic
from dhr_jax.settings import UserError


@dataclasses.dataclass
class Session:
  """What the set-up gives the batches: the checked config, the workdir
  (absolute, locked), the inputs [(name, path)], `loading.Models`, the
  `edits.EditSpec`s, dlib's face models (None without the `faces` extra),
  the synthetic inputs' {name: GroundTruth} (None for files) and the
  start time."""
  config: object
  workdir: str
  entries: list
  models: object
  edits: list
  face_models: object
  ground_truth: object
  t_start: float


@contextlib.contextmanager
def prepare(config, workdir, *, models=None, hfgi=False,
            compare_encoders=False):
  """The set-up of a run, a comparison or the app's runs → a `Session`,
  the workdir locked while it is held.

  Every setting (checked by the caller), the inputs, the models and the
  workdir's parent are checked before anything is created. models: already
  loaded (the app loads them once for every upload); hfgi: also load
  config.model.hfgi; compare_encoders: also config.compare.encoders.
  """
  t_start = time.time()
  workdir = os.path.abspath(workdir)
  try:
    files.check_creatable(workdir)
  except files.WorkdirError as e:
    raise UserError(str(e)) from None
  entries = None
  if config.data.input != "synthetic":
    try:
      entries = io.list_images(config.data.input)
    except io.ImageError as e:
      raise UserError(str(e)) from None
  face_models = loading.face_models(config)
  with contextlib.ExitStack() as held:
    # A workdir that exists may be another run's: refuse now, not after the
    # models are loaded. A new one is locked as soon as it is made.
    if os.path.isdir(workdir):
      held.enter_context(lock.hold(workdir))
    if models is None:
      models = loading.load_models(config, loading.make_mesh(), hfgi,
                                   compare_encoders)
    # DHR refines: in a run of edit.method='dhr', and in every comparison.
    if settings.edit_method(config) == "dhr" or compare_encoders:
      settings.check_feature_idx(config, models.G)
    edits = edits_lib.from_config(
        config.edit, models.G, num_classes=None if models.diffcam is None
        else models.diffcam.num_classes)
    if not os.path.isdir(workdir):
      try:
        files.check_writable(workdir)
      except files.WorkdirError as e:
        raise UserError(str(e)) from None
      held.enter_context(lock.hold(workdir))
    gt = None
    if config.data.input == "synthetic":
      source, gt = synthetic.write_inputs(config, workdir, models.G)
      entries = io.list_images(source)
    yield Session(config, workdir, entries, models, edits, face_models, gt,
                  t_start)


class Progress:
  """The images bar, with the running batch's stage beside it.

  Stages come from `pipeline` and `methods`, the refinement steps from XLA's
  callback thread; the bar is redrawn at most every `interval` seconds
  (and on every stage change) so that the compiled loops never wait on it.
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


def _titled(progress, title, stage):
  progress(f"{title}: {stage}")


@dataclasses.dataclass
class Batch:
  """One computed batch: `results` {name: {method: ImageResult}} of its
  readable images, `todo` the names still to write, `files` {name: input
  path}, `notes` {name: {...}} for the marker, `share` each image's share of
  the compute seconds, `times` {stage or method: seconds}."""
  number: int
  todo: list
  files: dict
  results: dict
  notes: dict
  share: float
  times: dict


class BatchLoop:
  """The one batch loop: iterate it for each computed `Batch`.

  Batches are fixed slices of the sorted inputs, and process k of a
  multi-process run takes every n-th batch: an image is computed in the
  same batch, at the same position, whether the run is resumed or split
  over processes. Which images share a batch changes the float rounding of
  batched operations (an LPIPS metric moved by 1e-8 when an image changed
  partners), so this is what keeps every output the same bytes.

  complete(name): the image is finished from an earlier run (skipped, or
  recomputed only for its batch and not yielded in `todo`). `failed`
  collects [{'name', 'file', 'reason'}] of unreadable inputs and failed
  batches (start it with earlier failures); `mine`: this process's inputs;
  `skipped`: how many of them were complete.
  """

  def __init__(self, session, entries, methods, *, complete=None,
               failed=(), listener=None, desc="DHR", titles=None):
    self.session, self.entries = session, entries
    self.methods = list(methods)
    # {method: title}: each method's stages are shown as '<title>: <stage>'
    # (the comparison's several methods); None shows them as they are.
    self.titles = titles
    self.complete = complete or (lambda name: False)
    self.failed = list(failed)
    config, models = session.config, session.models
    b = pipeline.padded_size(None, config.batch_size, models.n_devices)
    if b != int(config.batch_size):
      logging.info("batch size %d rounded up to %d (a multiple of %d "
                   "devices)", config.batch_size, b, models.n_devices)
    logging.info("%d input(s) from %s, batches of %d on %d device(s)",
                 len(entries), config.data.input, b, models.n_devices)
    self.skipped = sum(self.complete(n) for n, _ in entries)
    if self.skipped:
      logging.info("%d image(s) already complete in %s; skipping them",
                   self.skipped, session.workdir)
    process, n_processes = jax.process_index(), jax.process_count()
    if n_processes > 1 and (jax.device_count()
                            != n_processes * jax.local_device_count()):
      # Each process cuts the batches itself, from its own device count.
      raise UserError(f"every process needs the same number of devices; "
                      f"this one has {jax.local_device_count()} of the "
                      f"{jax.device_count()} in {n_processes} processes")
    self.chunks = [entries[s:s + b] for s in range(0, len(entries), b)]
    self.numbered = list(enumerate(self.chunks, 1))[process::n_processes]
    self.mine = [e for _, chunk in self.numbered for e in chunk]
    if n_processes > 1:
      if len(self.chunks) < n_processes:
        logging.warning("%d batch(es) for %d processes: %d process(es) have "
                        "nothing to do (lower --config.batch_size to share "
                        "the work)", len(self.chunks), n_processes,
                        n_processes - len(self.chunks))
      self.skipped = sum(self.complete(n) for n, _ in self.mine)
      logging.info("process %d of %d: %d of the %d input(s)", process,
                   n_processes, len(self.mine), len(entries))
    self.progress = Progress(len(self.mine), self.skipped, listener=listener,
                             desc=desc)

  def _load(self, chunk):
    names, images = [], []
    for name, path in chunk:
      try:
        images.append(io.load_image(path, self.session.models.G.config[
            "size"]))
        names.append(name)
      except io.ImageError as e:
        logging.warning("skipping %s", e)
        self.failed.append(dict(name=name, file=path, reason=settings.short(
            str(e).replace(path + ": ", ""))))
        self.progress.update(1)
    return names, images

  def _compute(self, names, images):
    """{name: {method: ImageResult}} and {stage: seconds} of one batch."""
    s = self.session
    config, models = s.config, s.models
    landmarks, notes = None, {}
    if models.parser is not None:
      landmarks, why = photos.parser_landmarks(
          s.face_models, np.stack(images),
          aligned_crops=bool(config.data.get("align", False)))
      notes = {n: dict(landmarks=w or "detected") for n, w in zip(names, why)}
    if methods_lib.NEEDS_DSS.isdisjoint(
        methods_lib.split(m)[0] for m in self.methods):
      emb = pipeline.batch_only(models, config, np.stack(images), names)
    else:
      emb = pipeline.segment_and_embed(models, config, np.stack(images),
                                       names, progress=self.progress,
                                       landmarks=landmarks)
    results, times = {n: {} for n in names}, dict(emb.times)
    encoded = {}  # {encoder: the batch with its embedding}
    for method in self.methods:
      t = time.perf_counter()
      progress = self.progress
      if self.titles is not None:
        progress = functools.partial(_titled, self.progress,
                                     self.titles[method])
      base, encoder = methods_lib.split(method)
      start, given = emb, models
      if encoder is not None and base not in methods_lib.NEEDS_DSS:
        # It encodes the batch itself (diffcam): that encoder is its own.
        given = methods_lib.models_with_encoder(models, encoder)
      elif encoder is not None:
        # The first method from an encoder counts its encoding seconds.
        if encoder not in encoded:
          encoded[encoder] = methods_lib.with_encoder(models, config, emb,
                                                      encoder, progress)
        start = encoded[encoder]
      for r in methods_lib.METHODS[base](
          given, config, start, s.edits, ground_truth=s.ground_truth,
          progress=progress):
        results[r.name][method] = r
      times[method] = time.perf_counter() - t
    return results, notes, times

  def _score_identity(self, results):
    """id_dlib (with the faces extra) and the paper's ID metric (with
    config.model.id_network) of every finished result."""
    s = self.session
    for by_method in results.values():
      for r in by_method.values():
        if not r.ok:
          continue
        if s.face_models is not None:
          r.metrics.update(photos.identity_metrics(s.face_models, r.target,
                                                   r.image, r.edits))
        if s.models.id_network is not None:
          r.metrics.update(identity.metrics(s.models.id_network,
                                            s.face_models, r.target, r.image))

  def __iter__(self):
    try:
      n_batches = len(self.chunks)
      for number, chunk in self.numbered:
        todo = [n for n, _ in chunk if not self.complete(n)]
        if not todo:
          continue
        names, images = self._load(chunk)
        if not any(n in todo for n in names):
          continue
        self.progress.start_batch(number, n_batches, todo)
        t0 = time.perf_counter()
        try:
          results, notes, times = self._compute(names, images)
          self._score_identity(
              {n: r for n, r in results.items() if n in todo})
        except pipeline.PipelineError as e:
          raise UserError(str(e)) from None
        except Exception as e:  # one bad batch must not end the run
          logging.exception("batch %s failed", names)
          for name in names:
            if name in todo:
              self.failed.append(dict(
                  name=name, file=dict(chunk)[name],
                  reason=settings.short(f"{type(e).__name__}: {e}")))
              self.progress.update(1)
          continue
        self.progress("writing")
        share = (time.perf_counter() - t0) / len(names)
        yield Batch(number, [n for n in names if n in todo], dict(chunk),
                    results, notes, share, times)
        self.progress.update(sum(n in todo for n in names))
        logging.info("batch %s: %s", ", ".join(todo),
                     ", ".join(f"{k} {v:.1f} s" for k, v in times.items()))
    finally:
      # Also when the caller stops early or a batch raises: the bar and its
      # listener end with the loop.
      self.progress.close()


# --------------------------------------------------------------------------
# The outcome


@dataclasses.dataclass
class Outcome:
  """What a run, an edit pass or a comparison did; `status` is the process
  exit code, `message` its last line."""
  done: list
  failed: list   # [{'name', 'file', 'reason'}]
  skipped: int
  status: int
  message: str


def failure_line(total, done, failed, kind="images"):
  """The outcome's line when some of `total` images (or faces) failed."""
  head = f"DHR: {len(done)} of {total} {kind} done, {len(failed)} failed: "
  parts = [f"{f['file']} ({f['reason']})" for f in failed[:5]]
  more = f"; and {len(failed) - 5} more" if len(failed) > 5 else ""
  return head + "; ".join(parts) + more + " — see summary.json"


def _cell(v):
  return f"{v:.4g}" if isinstance(v, float) else str(v)


def print_table(rows, columns, file=None):
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
