"""Raw photos through a run: faces aligned before DHR, results pasted back.

With `config.data.align`, every input photo becomes one input per face
(`config.data.faces`: 'largest' or 'all' detected faces whose box side is
at least `config.data.min_face_size` px), FFHQ-aligned at the generator's
size (`dhr_jax.faces`). Layout of OUT/<photo>/:

  faces.json           the photo's path and size, every face's detector box,
                       score, 68 landmarks and aligned square (quad)
  aligned/face<k>.png  face k's aligned crop: the run's input for it
  face<k>/             DHR outputs of face k, as for any input
  face<k>/pasted/inversion.png, face<k>/pasted/edits/<label>.png
                       the inversion and every edit put back into the photo
  pasted_all.png       every face's inversion put back into one photo

A photo without a face is a failed input (its reason says so), not an
error. The pasted pictures are made from the written PNGs after the faces
are done, so they are remade by every run and every re-edit.
"""
import os
import shutil

import numpy as np

from dhr_jax import alignment
from dhr_jax import faces
from dhr_jax import files
from dhr_jax import io
from dhr_jax import workdir

FACES_FILE = workdir.FACES_FILE
TEMPLATE_NOTE = "canonical FFHQ template (no face found in the input)"
NO_FACE_NOTE = ("no face found: no parsing mask, class 0 for every "
                "superpixel (the official fallback)")
NO_EXTRA_NOTE = ("canonical FFHQ template (the faces extra is not installed: "
                 "pip install 'dhr_jax[faces]')")

_MODELS = {}


def face_models(required=False):
  """dlib's models (loaded once per process), or None without the extra.

  required: raise `faces.FacesUnavailable` instead of returning None.
  """
  if "models" not in _MODELS:
    try:
      _MODELS["models"] = faces.load_models()
    except faces.FacesUnavailable:
      if required:
        raise
      return None
  return _MODELS["models"]


def face_dir(photo_name, k):
  """The image name (and output folder) of face k of a photo."""
  return f"{workdir.output_name(photo_name)}/face{k}"


def prepare(entries, workdir_path, size, models, which="largest", min_size=0,
            upsample=1, min_score=faces.MIN_SCORE):
  """Detects and aligns the faces of every photo of `entries`.

  entries: [(name, path)] as from `io.list_images`. Writes each photo's
  faces.json and aligned crops. Returns ([(face name, aligned path)],
  [failure dicts (name, file, reason)] for photos without a usable face or
  unreadable).
  """
  out, failed = [], []
  for name, path in entries:
    try:
      photo = io.load_photo(path)
    except io.ImageError as e:
      failed.append(dict(name=name, file=path,
                         reason=str(e).replace(path + ": ", "")))
      continue
    found = faces.align_faces(models, photo, size, which, upsample=upsample,
                              min_score=min_score, min_size=min_size)
    if not found:
      failed.append(dict(name=name, file=path, reason=(
          f"no face found (dlib HOG detector, score ≥ {min_score:g}, box "
          f"side ≥ {min_size} px); give an aligned face with "
          "--config.data.align=False or lower --config.data.min_face_size")))
      continue
    directory = os.path.join(workdir_path, workdir.output_name(name))
    records = []
    for k, al in enumerate(found):
      crop = os.path.join(directory, "aligned", f"face{k}.png")
      data = files.png_bytes(al.image)
      if not os.path.isfile(crop) or open(crop, "rb").read() != data:
        files.write_bytes(crop, data)
      records.append(dict(box=list(al.face.box), score=al.face.score,
                          landmarks=al.face.landmarks.tolist(),
                          quad=al.quad.tolist()))
      out.append((face_dir(name, k), crop))
    files.write_json(os.path.join(directory, FACES_FILE), dict(
        photo=os.path.abspath(path), height=photo.shape[0],
        width=photo.shape[1], size=size, faces=records))
  return out, failed


def paste_photo(workdir_path, name, path, stamp=None):
  """Puts every finished face of one prepared photo back into it.

  Writes face<k>/pasted/inversion.png and pasted/edits/<label>.png for each
  face whose marker is complete (and has fingerprint `stamp` if given), and
  pasted_all.png with all their inversions. Returns the files written,
  relative to OUT/<photo>/.
  """
  directory = os.path.join(workdir_path, workdir.output_name(name))
  info = workdir.read_faces(directory)
  if info is None:
    return []
  photo = io.load_photo(path)
  written, pastes = [], []
  for k, record in enumerate(info["faces"]):
    sub = f"face{k}"
    d = os.path.join(directory, sub)
    marker = workdir.read_marker(d)
    if marker is None or (stamp is not None and
                          marker.get("fingerprint") != stamp):
      continue
    quad = np.asarray(record["quad"])
    inversion = files.read_png(os.path.join(d, "inversion.png"))
    pasted, _ = faces.paste(photo, inversion, quad)
    # Rebuilt from the marker's edits, which a --mode=edit pass may change.
    shutil.rmtree(os.path.join(d, "pasted"), ignore_errors=True)
    files.write_bytes(os.path.join(d, "pasted", "inversion.png"),
                   files.png_bytes(pasted))
    written.append(f"{sub}/pasted/inversion.png")
    for label in marker.get("edits", []):
      edit = files.read_png(os.path.join(d, "edits", f"{label}.png"))
      pasted, _ = faces.paste(photo, edit, quad)
      rel = f"pasted/edits/{label}.png"
      files.write_bytes(os.path.join(d, rel), files.png_bytes(pasted))
      written.append(f"{sub}/{rel}")
    pastes.append((inversion, quad))
  if pastes:
    together, _ = faces.paste_all(photo, pastes)
    files.write_bytes(os.path.join(directory, "pasted_all.png"),
                   files.png_bytes(together))
    written.append("pasted_all.png")
  return written


def parser_landmarks(models, targets, *, aligned_crops=False):
  """Five landmarks per image for the face parser, and how each was found.

  The official code detects faces with RetinaFace and parses the
  top-scoring one; RetinaFace's weights are not to be had offline, so
  dlib's HOG detector (`models`, the `faces` extra) stands in and its
  top-scoring face gives the five points. Without the extra (models None)
  every image gets the canonical FFHQ template (the inputs are meant to be
  FFHQ-aligned).

  targets: (B, H, W, 3) in [-1, 1]. aligned_crops: the images are faces
  this run aligned from detections (config.data.align), so a face is known
  to be there and the template stands in where the detector misses it on
  the crop. Otherwise an image without a face gets an all-NaN row, which
  DSS reads as "no face": no parsing mask and class 0 for every superpixel,
  as the official code does when RetinaFace finds nothing.

  Returns ((B, 5, 2) float32, [note or '' per image]): the note says why
  an image has no detected landmarks.
  """
  images = io.to_uint8(targets)
  out, notes = [], []
  for img in images:
    if models is None:
      out.append(alignment.ffhq_landmarks(img.shape[0]))
      notes.append(NO_EXTRA_NOTE)
    elif aligned_crops:
      five, found = faces.landmarks_or_template(models, img)
      out.append(five)
      notes.append("" if found else TEMPLATE_NOTE)
    else:
      found = faces.detect(models, img)
      if found:
        out.append(max(found, key=lambda f: f.score).five)
        notes.append("")
      else:
        out.append(np.full((5, 2), np.nan))
        notes.append(NO_FACE_NOTE)
  return np.stack(out).astype(np.float32), notes


def identity_metrics(models, target, image, edits):
  """{'id_dlib': ..., 'id_dlib_<label>': ...}: dlib face-descriptor cosine
  of the input with the inversion and with each edit, all read from the
  input's face chip (the outputs are pixel-aligned with it). Empty when the
  input shows no face the detector accepts."""
  if models is None:
    return {}
  inp = io.to_uint8(target)
  found = faces.select(faces.detect(models, inp), "largest")
  if not found:
    return {}
  lm = found[0].landmarks
  ref = faces.face_descriptor(models, inp, lm)
  out = {"id_dlib": faces.cosine(ref, faces.face_descriptor(
      models, io.to_uint8(image), lm))}
  for label, e in edits.items():
    out[f"id_dlib_{label}"] = faces.cosine(ref, faces.face_descriptor(
        models, io.to_uint8(e), lm))
  return out
