"""What `python run.py` does: the mode's function over a workdir.

`main(config, workdir, mode)` is the whole command: 'run' (`run`: invert,
refine and edit every input), 'edit' (`edit`: render config.edit again for
every finished image from its saved refined/ state) or 'compare'
(`dhr_jax.compare.run`). Each goes through the one run skeleton
(`dhr_jax.loop`) and the workdir's layout (`dhr_jax.workdir`); with
config.data.align, OUT/<photo>/face<k>/ per face and the results pasted
back into the photo (`dhr_jax.photos`).

Bad settings raise `UserError` (one line for the user, exit status 2).
"""
import logging as std_logging
import os
import sys
import time

from absl import logging
import jax
import numpy as np
from tqdm import tqdm

from dhr_jax import checkpoint
from dhr_jax import compare
from dhr_jax import distributed
from dhr_jax import edits as edits_lib
from dhr_jax import files
from dhr_jax import io
from dhr_jax import loading
from dhr_jax import lock
from dhr_jax import loop
from dhr_jax import photos
from dhr_jax import pictures
from dhr_jax import refine
from dhr_jax import settings
from dhr_jax import workdir as workdir_lib
from dhr_jax.settings import UserError


def run(config, workdir, *, models=None, progress=None):
  """Inverts, refines and edits every input of `config` into `workdir`.

  models: `loading.load_models(config, ...)` already loaded (the app loads
  them once for every upload). progress: optional `progress(stage)`, told
  every stage and refinement step as the bar is.
  """
  settings.validate_config(config)
  with loop.prepare(config, workdir, models=models) as s:
    return _run(s, progress)


def _run(s, listener):
  config, workdir = s.config, s.workdir
  G = s.models.G
  stamp = settings.fingerprint(config)
  photo_entries, entries, photo_failed = s.entries, s.entries, []
  align = bool(config.data.get("align", False))
  if align:
    entries, photo_failed = photos.prepare(
        photo_entries, workdir, G.config["size"], s.face_models,
        config.data.faces, min_size=int(config.data.min_face_size))
    for f in photo_failed:
      logging.warning("%s: %s", f["file"], f["reason"])
  edit_names = [e.name for e in s.edits]
  method = settings.edit_method(config)
  batches = loop.BatchLoop(
      s, entries, [method], failed=photo_failed, listener=listener,
      complete=lambda name: workdir_lib.complete(workdir, name, stamp))
  for batch in batches:
    for name in batch.todo:
      r = batch.results[name][method]
      if not r.ok:
        logging.warning("%s failed: %s", r.name, r.reason)
        batches.failed.append(dict(name=r.name, file=batch.files[r.name],
                                   reason=r.reason))
      else:
        workdir_lib.write_image(workdir, r, G, config, batch.files[r.name],
                                stamp, batch.share, edit_names,
                                batch.notes.get(r.name))
    if jax.process_index() == 0:
      # One writer, showing every process's finished images.
      workdir_lib.index(workdir, entries, batches.failed, stamp,
                        method=method)
  if align:
    failed_photos = {f["name"] for f in photo_failed}
    for name, path in photo_entries:
      if name not in failed_photos:
        try:
          photos.paste_photo(workdir, name, path, stamp)
        except io.ImageError as e:  # the faces are done; say what failed
          failure = dict(name=name, file=path, reason=settings.short(e))
          batches.failed.append(failure)
          photo_failed.append(failure)
  order = {name: i for i, (name, _) in enumerate(
      entries + [(f["name"], f["file"]) for f in photo_failed])}
  gathered = distributed.gather_failures(batches.failed, batches.skipped,
                                         order)
  if gathered is None:  # a sibling process: process 0 writes the summary
    done = [r["name"] for r in workdir_lib.read_rows(workdir, batches.mine,
                                                     stamp)]
    return loop.Outcome(
        done, batches.failed, batches.skipped, 1 if batches.failed else 0,
        f"DHR process {jax.process_index()}: {len(done)} of its "
        f"{len(batches.mine)} images done in {workdir}, "
        f"{len(batches.failed)} failed; process 0 writes the summary")
  failed, skipped = gathered
  photo_count = len(photo_entries) if align else None
  return finish(config, workdir, entries, failed, skipped, s.t_start, "run",
                s.face_models, photos=photo_count)


def finish(config, workdir, entries, failed, skipped, t_start, mode,
           face_models=None, photos=None):
  """metrics.csv, summary.json and index.html from every complete image;
  the outcome. face_models: dlib's, if the run had them (the parser's
  landmarks came from them). photos: with config.data.align, how many
  photos `entries` (their faces) came from; `failed` then holds the photos
  without a face too, and the summary counts photos and faces apart."""
  stamp = settings.fingerprint(config)
  rows = workdir_lib.read_rows(workdir, entries, stamp)
  columns = workdir_lib.columns(rows)
  files.write_csv(os.path.join(workdir, "metrics.csv"), rows, columns)
  means = {c: float(np.mean([r[c] for r in rows]))
           for c in columns[1:] if rows and all(c in r for r in rows)}
  if photos is None:
    counts, total, kind = dict(images=len(entries)), len(entries), "images"
  else:
    # Photos that gave no face (none found, or unreadable) fail by their own
    # name; failed faces are among `entries`.
    faces = {n for n, _ in entries}
    counts = dict(photos=photos, faces=len(entries), photos_failed=sum(
        f["name"] not in faces for f in failed))
    total, kind = len(entries), "faces"
  summary = dict(
      mode=mode, **counts, done=len(rows), failed=failed,
      skipped_complete=skipped, means=means, config=config.to_dict(),
      versions=workdir_lib.versions(), devices=[str(d) for d in jax.devices()],
      seconds=time.time() - t_start, fingerprint=stamp,
      dss=settings.dss_description(config))
  landmarks = settings.landmarks_description(config, face_models)
  if landmarks is not None:
    summary["parser_landmarks"] = landmarks
  empty = workdir_lib.marker_notes(workdir, entries, stamp, "empty_heat_map")
  if empty:  # edit.method='diffcam': edits that found no region
    summary["empty_heat_map"] = empty
  if jax.process_count() > 1:
    summary["processes"] = jax.process_count()
  files.write_json(os.path.join(workdir, "summary.json"), summary)
  workdir_lib.index(workdir, entries, failed, stamp, rows,
                    method=settings.edit_method(config))
  if len(rows) <= 20:
    loop.print_table(rows + ([dict(name="mean", **means)] if len(rows) > 1
                             else []), columns)
  elif means:
    print("mean  " + "  ".join(f"{k}={v:.4g}" for k, v in means.items()))
  done = [r["name"] for r in rows]
  of = "" if photos is None else f" of {photos} photos"
  if failed:
    return loop.Outcome(done, failed, skipped, 1, loop.failure_line(
        total, rows, failed, kind=kind + of))
  return loop.Outcome(done, [], skipped, 0,
                      f"DHR: {len(rows)} of {total} {kind}{of} done in "
                      f"{workdir} (see index.html)")


# --------------------------------------------------------------------------
# The edit pass


def edit(config, workdir):
  """Renders config.edit again for every finished image of `workdir`,
  beside its earlier edits (one of the same label is replaced)."""
  workdir = os.path.abspath(workdir)
  settings.validate_config(config)
  if not os.path.isdir(workdir):
    raise UserError(f"workdir {workdir} does not exist; run without "
                    "--mode=edit first")
  if settings.edit_method(config) != "dhr":
    raise UserError("--mode=edit re-edits DHR's refined generators; "
                    "edit.method='diffcam' keeps none: run it again with "
                    "the new directions")
  with lock.hold(workdir):
    G = loading.load_generator(config)
    specs = edits_lib.from_config(config.edit, G)
    if not specs:
      raise UserError("no edits configured: set --config.edit.directions="
                      "name=path.npy, --config.edit.ganspace=... or "
                      "--config.edit.random_direction_seed=0")
    # Re-editing needs the refined state and the grid's pictures only.
    entries = workdir_lib.finished(workdir, optional=("edits/", "grid.png"))
    if not entries:
      raise UserError(f"{workdir} holds no finished images (no "
                      f"{workdir_lib.MARKER}); run without --mode=edit first")
    return _edit_entries(workdir, G, specs, entries)


def _edit_entries(workdir, G, specs, entries):
  edit_names = [e.name for e in specs]
  done, failed = [], []
  for name, directory, marker in tqdm(entries, unit="img", desc="edit"):
    try:
      refined = refine.load_refined(os.path.join(directory, "refined"), G)
    except (checkpoint.CheckpointError, OSError, KeyError, ValueError) as e:
      failed.append(dict(name=name, file=directory,
                         reason=settings.short(e)))
      continue
    rendered = edits_lib.render_edits(G, refined, specs)
    read = lambda f: files.read_png(os.path.join(directory, f))
    # Earlier edits are kept (a new one of the same name replaces its file);
    # the grid and the marker list them first, then this pass's.
    earlier = [l for l in marker.get("edits", []) if l not in rendered and
               os.path.isfile(os.path.join(directory, "edits", f"{l}.png"))]
    written = [f for f in marker["files"]
               if not f.startswith("edits/") and f != "grid.png"]
    written += [f"edits/{l}.png" for l in earlier]
    tiles = {l: read(f"edits/{l}.png") for l in earlier}
    tiles.update(workdir_lib.write_edits(directory, rendered, written))
    names = list(dict.fromkeys(marker.get("edit_names", []) + edit_names))
    workdir_lib.write_png(directory, "grid.png", pictures.image_grid(
        read("input.png"), read("inversion.png"), read("mask.png"), tiles,
        names), written)
    marker.update(edits=list(tiles), edit_names=names, files=written)
    files.write_json(os.path.join(directory, workdir_lib.MARKER), marker)
    done.append(name)
  for directory in workdir_lib.photo_dirs(workdir):
    faces_file = workdir_lib.read_faces(directory)
    if faces_file is None:  # unreadable: its faces were re-edited above
      failed.append(dict(name=os.path.basename(directory), file=directory,
                         reason=f"{workdir_lib.FACES_FILE} is unreadable"))
      continue
    source = faces_file["photo"]
    try:
      photos.paste_photo(workdir, os.path.basename(directory), source)
    except io.ImageError as e:
      failed.append(dict(name=os.path.basename(directory), file=source,
                         reason=settings.short(e)))
  rows = [dict(name=n, dir=os.path.relpath(d, workdir), **m["metrics"])
          for n, d, m in entries if n in done]
  workdir_lib.write_index(workdir, rows, workdir_lib.columns(rows), failed)
  if failed:
    return loop.Outcome(done, failed, 0, 1,
                        loop.failure_line(len(entries), done, failed))
  return loop.Outcome(done, [], 0, 0,
                      f"DHR: re-edited {len(done)} of {len(entries)} images "
                      f"in {workdir} (see index.html)")


# --------------------------------------------------------------------------
# The command


def _quiet_orbax(record):
  # orbax logs every checkpoint step at INFO, which would bury the run's own
  # messages among those of loading the models.
  return (record.levelno >= std_logging.WARNING
          or "orbax" not in record.pathname)


MODES = dict(run=run, edit=edit, compare=compare.run)


def main(config, workdir, mode="run"):
  """What `python run.py` does with its parsed flags → the exit status.

  mode: a key of MODES; the outcome's one line ends the output (stderr when
  something failed), a UserError is one `error:` line and status 2.
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
    if distributed.init_distributed() and jax.process_count() > 1 and (
        mode != "run" or config.data.get("align", False)):
      # They write run-level files per photo or per image from one list.
      raise UserError(f"--mode={mode} and data.align run in one process; "
                      "unset JAX_COORDINATOR_ADDRESS")
    outcome = MODES[mode](config, workdir)
  except UserError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  print(outcome.message, file=sys.stderr if outcome.status else sys.stdout)
  return outcome.status
