"""The workdir's layout on disk, read and written by run, compare, the edit
pass and the browser editor.

  OUT/<name>/            one image: input.png, inversion.png, mask.png,
                         grid.png, edits/<label>.png, refined/, and the
                         marker done.json, written last (a folder without a
                         complete marker is unfinished: a rerun redoes it);
                         with edit.method='diffcam' no mask.png and no
                         refined/, but diffcam/<label>/ (manipulated,
                         heat_map, fused) beside the deghosted edits/
  OUT/<photo>/faces.json, OUT/<photo>/face<k>/
                         an aligned photo's faces (`dhr_jax.photos`)
  OUT/inputs/            the demo's synthetic inputs, the app's uploads
  OUT/metrics.csv, OUT/summary.json, OUT/index.html
                         run level, from every finished image's marker
"""
import html
import json
import os
import platform
import shutil
import time
import urllib.parse

import flax
import jax
import jaxlib
import numpy as np
import optax
import orbax.checkpoint as ocp

import dhr_jax
from dhr_jax import files
from dhr_jax import identity
from dhr_jax import io
from dhr_jax import metrics
from dhr_jax import pictures
from dhr_jax import refine
from dhr_jax import synthetic

MARKER = "done.json"
# An aligned photo's faces (`dhr_jax.photos`): OUT/<photo>/faces.json.
FACES_FILE = "faces.json"
# Names of run-level entries of the workdir that an image folder must not take.
RESERVED = ("metrics.csv", "summary.json", "inputs", "index.html")


def output_name(name):
  """The folder name of an image (run-level names get a suffix)."""
  return name + "_img" if name in RESERVED or name.startswith(".") else name


def read_marker(image_dir, optional=()):
  """The completion marker of an image folder, or None when it is missing,
  unreadable, or a file it lists is gone (the outputs are not complete).

  optional: prefixes of listed files that may be missing (re-editing only
  needs the refined state and the pictures the grid is made of).
  """
  path = os.path.join(image_dir, MARKER)
  try:
    with open(path) as f:
      marker = json.load(f)
  except (OSError, ValueError):
    return None
  files = marker.get("files")
  if not isinstance(files, list):
    return None
  for rel in files:
    if rel.startswith(tuple(optional)):
      continue
    if not os.path.exists(os.path.join(image_dir, rel)):
      return None
  return marker


def complete(workdir, name, stamp):
  """Whether image `name` is finished in `workdir` with settings `stamp`
  (`settings.fingerprint`)."""
  marker = read_marker(os.path.join(workdir, output_name(name)))
  return marker is not None and marker.get("fingerprint") == stamp


def finished(workdir, optional=()):
  """[(name, folder, marker)] of every finished image of `workdir`
  (OUT/<name>/, or OUT/<photo>/face<k>/ for the faces of an aligned photo),
  sorted by folder. optional: as `read_marker`'s."""
  out = []
  if not os.path.isdir(workdir):
    return out
  for name in sorted(os.listdir(workdir)):
    directory = os.path.join(workdir, name)
    if name.startswith(".") or not os.path.isdir(directory):
      continue
    candidates = [directory]
    if is_photo(directory):
      candidates = [os.path.join(directory, f)
                    for f in sorted(os.listdir(directory))
                    if f.startswith("face") and
                    os.path.isdir(os.path.join(directory, f))]
    for d in candidates:
      marker = read_marker(d, optional)
      if marker is not None:
        out.append((marker["name"], d, marker))
  return out


def is_photo(directory):
  """Whether an OUT/<name>/ folder is an aligned photo's (faces.json)."""
  return os.path.isfile(os.path.join(directory, FACES_FILE))


def photo_dirs(workdir):
  """The folders of aligned photos in `workdir`."""
  return [os.path.join(workdir, n) for n in sorted(os.listdir(workdir))
          if is_photo(os.path.join(workdir, n))]


def read_faces(photo_dir):
  """An aligned photo's faces.json (its path, size and every face's box,
  landmarks and quad), or None when it is missing or unreadable."""
  try:
    with open(os.path.join(photo_dir, FACES_FILE)) as f:
      return json.load(f)
  except (OSError, ValueError):
    return None


def photo_and_quad(directory):
  """(photo uint8, quad) when the image folder is an aligned face of a
  photo (OUT/<photo>/face<k>), else (None, None)."""
  parent, sub = os.path.split(directory)
  info = read_faces(parent)
  try:
    k = int(sub[len("face"):])
    return io.load_photo(info["photo"]), info["faces"][k]["quad"]
  except (TypeError, OSError, ValueError, KeyError, IndexError,
          io.ImageError):
    return None, None


# --------------------------------------------------------------------------
# Writing one image


def write_png(directory, rel, array, written):
  """directory/rel as PNG; rel is appended to `written` (the marker's list)."""
  files.write_bytes(os.path.join(directory, rel), files.png_bytes(array))
  written.append(rel)


def write_edits(directory, rendered, written):
  """edits/<label>.png for every rendered edit → {label: uint8 tile}.

  Other files in edits/ stay: an edit pass adds to the edits of the run.
  """
  tiles = {}
  for label, img in rendered.items():
    u8 = io.to_uint8(img)
    write_png(directory, f"edits/{label}.png", u8, written)
    tiles[label] = u8
  return tiles


def grid_tiles(tiles, pictures_of_image):
  """The grid's edit columns: each edit's tile, after its heat map when the
  method made one (`<...>/<label>/heat_map.png` among the pictures)."""
  out = {}
  for label, tile in tiles.items():
    for rel, picture in pictures_of_image.items():
      if rel.endswith(f"/{label}/heat_map.png"):
        out[f"{label} heat map"] = picture
    out[label] = tile
  return out


def marker_notes(workdir, entries, stamp, key):
  """{name: marker[key]} of the complete images of `entries` that have it."""
  out = {}
  for name, _ in entries:
    marker = read_marker(os.path.join(workdir, output_name(name)))
    if (marker is not None and marker.get("fingerprint") == stamp
        and key in marker):
      out[name] = marker[key]
  return out


def write_image(workdir, r, G, config, source, stamp, seconds_before=0.0,
                edit_names=(), notes=None):
  """All outputs of one successful image, the marker last.

  seconds_before: this image's share of the batch's compute time; the
  marker records it plus the time spent writing. edit_names: the edits'
  names, to title the grid's columns 'name strength'. notes: more entries
  for the marker (e.g. where the parser's landmarks came from).
  """
  t0 = time.perf_counter()
  directory = os.path.join(workdir, output_name(r.name))
  if os.path.isdir(directory):
    shutil.rmtree(directory)  # leftovers of an interrupted attempt
  os.makedirs(directory)
  written = []
  if r.refined is not None:
    refine.save_refined(os.path.join(directory, "refined"), r.refined, G,
                        overwrite=True)
    written += ["refined/arrays.npz", "refined/config.json"]
  inp, inv = io.to_uint8(r.target), io.to_uint8(r.image)
  mask = None if r.mask is None else io.mask_to_uint8(r.mask)
  write_png(directory, "input.png", inp, written)
  write_png(directory, "inversion.png", inv, written)
  if mask is not None:
    write_png(directory, "mask.png", mask, written)
  if config.save.intermediate and r.coarse is not None:
    write_png(directory, "embedding.png", io.to_uint8(r.embedding), written)
    write_png(directory, "coarse.png", io.to_uint8(r.coarse), written)
    write_png(directory, "superpixels.png", pictures.superpixel_picture(
        inp, r.superpixels, r.boundaries), written)
    write_png(directory, "error_map.png", pictures.error_figure(r.error_map),
              written)
    if r.parsing is not None:
      write_png(directory, "parsing.png", pictures.parsing_picture(r.parsing),
                written)
  for rel, picture in r.pictures.items():
    write_png(directory, rel, picture, written)
  tiles = write_edits(directory, r.edits, written)
  write_png(directory, "grid.png", pictures.image_grid(
      inp, inv, mask, grid_tiles(tiles, r.pictures), edit_names), written)
  seconds = seconds_before + time.perf_counter() - t0
  marker = dict(name=r.name, source=source, fingerprint=stamp,
                metrics=dict(r.metrics, seconds=seconds),
                edits=list(r.edits), edit_names=list(edit_names),
                files=written, **(notes or {}), **r.notes)
  path = os.path.join(directory, MARKER)
  files.write_json(path, marker)
  return marker


# --------------------------------------------------------------------------
# Run level: metrics.csv, index.html, summary.json


def columns(rows):
  columns = ["name"] + list(metrics.METRICS) + ["seconds"]
  # id_dlib (the faces extra): inversion first, then each edit; then the
  # paper's ID metric (config.model.id_network).
  ids = sorted({c for r in rows for c in r if c.startswith("id_dlib")},
               key=lambda c: (c != "id_dlib", c))
  ids += [identity.COLUMN] * any(identity.COLUMN in r for r in rows)
  return columns + [c for c in synthetic.GT_METRICS
                    if any(c in r for r in rows)] + ids


def read_rows(workdir, entries, stamp):
  """A metrics row for every complete image of `entries`, in their order."""
  rows = []
  for name, _ in entries:
    marker = read_marker(os.path.join(workdir, output_name(name)))
    if marker is not None and marker.get("fingerprint") == stamp:
      rows.append(dict(name=name, **marker["metrics"]))
  return rows


# index.html's heading and what its grids show, by config.edit.method.
TITLES = dict(dhr="DHR", diffcam="Diff-CAM")
INDEX_INTROS = dict(
    dhr="Columns of each grid: input, inversion, mask (white = in-domain, "
    "refined in the generator weights; black = out-of-domain, refined as a "
    "feature offset), then the edits.",
    diffcam="Editing via differential activations. Columns of each grid: "
    "input, inversion (pSp's codes rendered by the generator), then per "
    "direction DiffCam's heat map of the edit (white = where the edit is "
    "blended into the photo) and the edit (the blend, deghosted). Each "
    "image's diffcam/&lt;edit&gt;/ folder also holds manipulated.png (the "
    "edited codes rendered by the generator), heat_map.png and fused.png "
    "(manipulated where the heat map is white, the photo elsewhere: the "
    "deghosting network's input).")


def write_index(workdir, rows, columns, failed=(), method="dhr"):
  """OUT/index.html: every finished image's grid with its metrics row.

  rows: [{'name', 'dir', metric: value, ...}] ('dir' the image's folder in
  the workdir); failed: [{'name', 'file', 'reason'}]; method: the run's
  config.edit.method (what the grids show). A static page with
  relative links (open it from disk or copy the folder anywhere); written
  atomically so a browser never shows half a page.
  """
  esc = html.escape
  cell = lambda v: f"{v:.4g}" if isinstance(v, float) else esc(str(v))
  head = "".join(f"<th>{esc(c)}</th>" for c in columns)
  parts = [
      "<!DOCTYPE html>", "<html><head><meta charset='utf-8'>",
      f"<title>{TITLES[method]} results</title>",
      "<style>body{font-family:sans-serif;margin:1em}"
      "table{border-collapse:collapse;margin:.3em 0 1.5em}"
      "td,th{border:1px solid #ccc;padding:2px 6px;text-align:right}"
      "img{max-width:100%;image-rendering:pixelated}</style>",
      "</head><body>",
      f"<h1>{TITLES[method]} results: {len(rows)} image(s) done"
      + (f", {len(failed)} failed" if failed else "") + "</h1>",
      f"<p>{INDEX_INTROS[method]} Metrics compare the inversion with the "
      "input; see metrics.csv and summary.json.</p>"]
  for r in rows:
    link = urllib.parse.quote(r["dir"])
    parts += [
        f"<h2 id='{esc(link)}'>{esc(r['name'])}</h2>",
        f"<a href='{link}/grid.png'><img src='{link}/grid.png' "
        f"alt='{esc(r['name'])}'></a>",
        f"<table><tr>{head}</tr><tr>"
        + "".join(f"<td>{cell(r.get(c, ''))}</td>" for c in columns)
        + "</tr></table>"]
  if failed:
    parts.append("<h2>Failed</h2><ul>")
    parts += [f"<li>{esc(str(f['file']))}: {esc(str(f['reason']))}</li>"
              for f in failed]
    parts.append("</ul>")
  parts.append("</body></html>")
  return files.write_text(os.path.join(workdir, "index.html"), "\n".join(parts)
                    + "\n")


def index(workdir, entries, failed, stamp, rows=None, method="dhr"):
  """OUT/index.html of the finished images of `entries` (method: as
  `write_index`'s)."""
  rows = read_rows(workdir, entries, stamp) if rows is None else rows
  write_index(workdir, [dict(r, dir=output_name(r["name"])) for r in rows],
              columns(rows), failed, method)


def versions():
  v = dict(dhr_jax=dhr_jax.__version__, jax=jax.__version__,
           jaxlib=jaxlib.__version__, flax=flax.__version__,
           optax=optax.__version__, numpy=np.__version__,
           python=platform.python_version(), platform=platform.platform())
  v["orbax"] = getattr(ocp, "__version__", "?")
  return v

