"""Real photos: face detection, landmarks, FFHQ alignment, paste-back, identity.

The FFHQ generator only knows faces aligned the way the FFHQ data set was
made, so an in-the-wild photo goes through the data set's own recipe
(NVlabs/ffhq-dataset, `recreate_aligned_images`) driven by dlib's 68 facial
landmarks, the landmarks FFHQ was aligned from. Every result at the
generator's size can then be put back into the photo through the inverse of
that alignment (`paste`).

Everything here needs the optional `faces` extra (`pip install -e .[faces]`:
dlib-bin and face-recognition-models, which ships dlib's model files, so
nothing is downloaded at run time). This module imports dlib only inside the
functions that need it, so `dhr_jax` itself imports without the extra.

Coordinates follow `dhr_jax.alignment`: (x, y) with pixel (row i, column j)
at (j, i). dlib's landmark coordinates are integer pixel indices, i.e. pixel
centres in that convention.
"""
import dataclasses
import importlib.util
import os
from typing import Any, Optional

import jax.numpy as jnp
import numpy as np
from PIL import Image
from scipy import ndimage

from dhr_jax import alignment

# Files of the face-recognition-models package this module uses.
LANDMARKS_68_FILE = "shape_predictor_68_face_landmarks.dat"
RECOGNITION_FILE = "dlib_face_recognition_resnet_model_v1.dat"

# A detection of dlib's HOG detector is kept when its score reaches this. On
# skimage's astronaut the face scores 1.16 and a false box on the mission
# patch 0.12 (upsample 1); frontal faces commonly score above 0.5.
MIN_SCORE = 0.5


class FacesUnavailable(RuntimeError):
  """The `faces` extra (dlib, its model files) is not installed or usable."""


# --------------------------------------------------------------------------
# Models


def _dlib():
  # dlib is the optional `faces` extra; only alignment and identity need it.
  try:
    import dlib
  except ImportError:
    raise FacesUnavailable(
        "face alignment needs the optional `faces` extra: pip install "
        "'dhr_jax[faces]' (dlib-bin, face-recognition-models)") from None
  return dlib


def default_model_dir():
  """The folder of dlib model files installed by face-recognition-models.

  Found without importing the package: its __init__ needs pkg_resources,
  which new setuptools no longer ships.
  """
  spec = importlib.util.find_spec("face_recognition_models")
  if spec is None or not spec.submodule_search_locations:
    raise FacesUnavailable(
        "dlib's model files come with face-recognition-models: pip install "
        "'dhr_jax[faces]'")
  return os.path.join(list(spec.submodule_search_locations)[0], "models")


@dataclasses.dataclass(eq=False)
class FaceModels:
  """dlib's HOG face detector, 68-point shape predictor and (optionally)
  the ResNet face descriptor."""
  detector: Any
  predictor: Any
  recognizer: Any = None


def load_models(landmarks_path=None, recognition_path=None, *,
                recognition=True):
  """dlib models from files (default: face-recognition-models' folder).

  recognition: also load the 128-d face descriptor network (for `id_dlib`).
  """
  dlib = _dlib()
  if landmarks_path is None or (recognition and recognition_path is None):
    folder = default_model_dir()
    landmarks_path = landmarks_path or os.path.join(folder, LANDMARKS_68_FILE)
    recognition_path = recognition_path or os.path.join(folder,
                                                        RECOGNITION_FILE)
  paths = [landmarks_path] + ([recognition_path] if recognition else [])
  for p in paths:
    if not os.path.isfile(p):
      raise FacesUnavailable(f"dlib model file {p} not found (it comes with "
                             "face-recognition-models)")
  return FaceModels(
      detector=dlib.get_frontal_face_detector(),
      predictor=dlib.shape_predictor(landmarks_path),
      recognizer=(dlib.face_recognition_model_v1(recognition_path)
                  if recognition else None))


# --------------------------------------------------------------------------
# Detection and landmarks


@dataclasses.dataclass
class Face:
  """One detected face: box (left, top, right, bottom) in pixels, the
  detector's score, 68 landmarks (68, 2) and the parser's five points."""
  box: tuple
  score: float
  landmarks: np.ndarray

  @property
  def five(self):
    return five_points(self.landmarks)

  @property
  def size(self):
    return min(self.box[2] - self.box[0], self.box[3] - self.box[1])


def five_points(landmarks68):
  """(68, 2) dlib landmarks → (5, 2) in `alignment`'s order: eye centres
  (image left, right), nose tip, mouth corners (image left, right)."""
  lm = np.asarray(landmarks68, np.float64)
  return np.stack([lm[36:42].mean(0), lm[42:48].mean(0), lm[30], lm[48],
                   lm[54]]).astype(np.float32)


def _rgb_u8(image):
  a = np.asarray(image)
  if a.dtype != np.uint8:
    raise ValueError(f"expected a uint8 image, got {a.dtype}")
  if a.ndim == 2:
    a = np.stack([a] * 3, -1)
  if a.ndim != 3 or a.shape[-1] != 3:
    raise ValueError(f"expected an (H, W, 3) RGB image, got {a.shape}")
  return np.ascontiguousarray(a)


def _landmarks(models, image, rect):
  shape = models.predictor(image, rect)
  return np.array([(p.x, p.y) for p in shape.parts()], np.float64)


def detect(models, image, *, upsample=1, min_score=MIN_SCORE, min_size=0,
           max_side=2048):
  """Faces of a uint8 RGB image, left to right.

  upsample: times dlib doubles the image before detecting (1 finds faces
  from about 40 px); min_score: the HOG score a detection needs (false
  boxes on textures score low, see MIN_SCORE); min_size: the smallest box
  side in pixels; max_side: larger photos are searched at this size
  (Lanczos) and the boxes scaled back, the landmarks are predicted at full
  resolution (upsampling a 12-megapixel photo for the HOG pyramid takes
  long and finds no more large faces).
  """
  dlib = _dlib()
  img = _rgb_u8(image)
  h, w = img.shape[:2]
  scale = 1.0
  search = img
  if max_side and max(h, w) > max_side:
    scale = max(h, w) / max_side
    search = np.asarray(Image.fromarray(img).resize(
        (max(1, int(round(w / scale))), max(1, int(round(h / scale)))),
        Image.LANCZOS))
  rects, scores, _ = models.detector.run(search, int(upsample),
                                         float(min_score))
  faces = []
  for rect, score in zip(rects, scores):
    box = tuple(int(round(v * scale)) for v in (
        rect.left(), rect.top(), rect.right(), rect.bottom()))
    if min(box[2] - box[0], box[3] - box[1]) < min_size:
      continue
    # dlib may return boxes reaching past the image; the predictor copes.
    lm = _landmarks(models, img, dlib.rectangle(*box))
    faces.append(Face(box=box, score=float(score), landmarks=lm))
  return sorted(faces, key=lambda f: (f.box[0], f.box[1]))


def select(faces, which="largest"):
  """'largest' → [the face with the largest box] (or []), 'all' → faces."""
  if which == "all":
    return list(faces)
  if which == "largest":
    return [max(faces, key=lambda f: (f.size, f.score))] if faces else []
  raise ValueError(f"faces must be 'largest' or 'all', got {which!r}")


def landmarks_or_template(models, image, **detect_kwargs):
  """Five landmarks of the most prominent face of an aligned image.

  Returns (landmarks (5, 2), found): the detected face's five points, or
  the canonical FFHQ template for the image's size when no face is found
  (found = False; the caller records it).
  """
  faces = select(detect(models, image, **detect_kwargs), "largest")
  if faces:
    return faces[0].five, True
  h, w = np.asarray(image).shape[:2]
  if h != w:
    raise ValueError(f"the canonical landmarks need a square image, got "
                     f"{h}×{w}")
  return alignment.ffhq_landmarks(h).astype(np.float32), False


# --------------------------------------------------------------------------
# FFHQ alignment


@dataclasses.dataclass
class Aligned:
  """An FFHQ-aligned crop and where it came from.

  image: (S, S, 3) uint8. quad: (4, 2) float64 photo pixel coordinates of
  the crop's outer corners top-left, bottom-left, bottom-right, top-right
  (the aligned square [0, S]² in pixel edges); `aligned_to_photo` turns it
  into a matrix for any image size covering the same square.
  """
  image: np.ndarray
  quad: np.ndarray
  face: Optional[Face] = None


def ffhq_quad(landmarks68):
  """The FFHQ recipe's oriented crop square from 68 landmarks.

  Returns (quad (4, 2) top-left, bottom-left, bottom-right, top-right in
  pixel centres, side length qsize). The square is centred a tenth of the
  way from the eyes' midpoint to the mouth's, turned so that the eye line
  is level (the vector between the eyes and the eye-to-mouth vector turned
  by 90° are averaged), and its half side is the larger of 2 × the eye
  distance and 1.8 × the eye-to-mouth distance.
  """
  lm = np.asarray(landmarks68, np.float64)
  eye_left, eye_right = lm[36:42].mean(0), lm[42:48].mean(0)
  eye_avg = (eye_left + eye_right) / 2
  eye_to_eye = eye_right - eye_left
  mouth_avg = (lm[48] + lm[54]) / 2
  eye_to_mouth = mouth_avg - eye_avg
  # eye_to_mouth turned by -90° points along the eye line.
  x = eye_to_eye + np.array([eye_to_mouth[1], -eye_to_mouth[0]])
  x = x / np.hypot(*x)
  x = x * max(np.hypot(*eye_to_eye) * 2.0, np.hypot(*eye_to_mouth) * 1.8)
  y = np.array([-x[1], x[0]])
  c = eye_avg + eye_to_mouth * 0.1
  quad = np.stack([c - x - y, c - x + y, c + x + y, c + x - y])
  return quad, float(np.hypot(*x) * 2)


def _pad_with_blur(img, pad, qsize):
  """The recipe's padding: reflect, blur towards the border, fade to the
  median colour (float32 throughout, rounded back to uint8)."""
  left, top, right, bottom = pad
  a = np.pad(img.astype(np.float32), ((top, bottom), (left, right), (0, 0)),
             "reflect")
  h, w, _ = a.shape
  y, x = np.ogrid[:h, :w]
  x = x.astype(np.float32)[..., None]
  y = y.astype(np.float32)[..., None]
  # 0 inside the original image, rising to 1 at the padded border.
  mask = np.maximum(1.0 - np.minimum(x / left, (w - 1 - x) / right),
                    1.0 - np.minimum(y / top, (h - 1 - y) / bottom))
  blur = qsize * 0.02
  a += (ndimage.gaussian_filter(a, [blur, blur, 0]) - a) * np.clip(
      mask * 3.0 + 1.0, 0.0, 1.0)
  a += (np.median(a, axis=(0, 1)) - a) * np.clip(mask, 0.0, 1.0)
  return np.uint8(np.clip(np.rint(a), 0, 255))


def align(photo, landmarks68, output_size, *, transform_size=None,
          enable_padding=True):
  """FFHQ alignment of one face, as the data set's recipe makes it.

  Steps (NVlabs/ffhq-dataset `recreate_aligned_images`): the oriented
  square from the eye and mouth landmarks (`ffhq_quad`); for faces more
  than twice the output size, a Lanczos downscale of the photo by the
  integer factor ⌊qsize / output_size / 2⌋; a crop around the square with a
  border of 10 % of its side; where the square reaches past the photo,
  reflect padding (at least 30 % of the side) blurred and faded to the
  median colour; the square resampled (bilinear) to transform_size² and
  Lanczos-downscaled to output_size². FFHQ used output 1024 and transform
  4096; transform_size defaults to that ratio (4 × output_size).

  photo: (H, W, 3) uint8 (or (H, W) grey). Returns `Aligned`; its quad is
  the exact footprint of the produced pixels in the photo, i.e. it includes
  the rounding of the downscaled photo's size.
  """
  photo = _rgb_u8(photo)
  output_size = int(output_size)
  transform_size = int(transform_size or 4 * output_size)
  quad, qsize = ffhq_quad(landmarks68)
  img = Image.fromarray(photo)
  h0, w0 = photo.shape[:2]

  # Shrink: the photo is resized with Lanczos; quad and size follow by the
  # integer factor, as in the recipe.
  shrink = int(np.floor(qsize / output_size * 0.5))
  scale = np.ones(2)
  if shrink > 1:
    rsize = (int(np.rint(w0 / shrink)), int(np.rint(h0 / shrink)))
    img = img.resize(rsize, Image.LANCZOS)
    scale = np.array([w0 / rsize[0], h0 / rsize[1]])
    quad = quad / shrink
    qsize = qsize / shrink

  # Crop to the square plus a border.
  offset = np.zeros(2)
  border = max(int(np.rint(qsize * 0.1)), 3)
  lo = np.floor(quad.min(0)).astype(int)
  hi = np.ceil(quad.max(0)).astype(int)
  crop = (max(lo[0] - border, 0), max(lo[1] - border, 0),
          min(hi[0] + border, img.size[0]), min(hi[1] + border, img.size[1]))
  if crop[2] - crop[0] < img.size[0] or crop[3] - crop[1] < img.size[1]:
    img = img.crop(crop)
    quad = quad - crop[:2]
    offset += crop[:2]

  # Pad where the square (plus border) leaves the photo.
  lo = np.floor(quad.min(0)).astype(int)
  hi = np.ceil(quad.max(0)).astype(int)
  pad = (max(-lo[0] + border, 0), max(-lo[1] + border, 0),
         max(hi[0] - img.size[0] + border, 0),
         max(hi[1] - img.size[1] + border, 0))
  if enable_padding and max(pad) > border - 4:
    pad = tuple(int(p) for p in np.maximum(pad, int(np.rint(qsize * 0.3))))
    img = Image.fromarray(_pad_with_blur(np.asarray(img), pad, qsize), "RGB")
    quad = quad + pad[:2]
    offset -= pad[:2]

  # PIL's QUAD transform takes pixel-edge coordinates, hence + 0.5.
  img = img.transform((transform_size, transform_size), Image.QUAD,
                      tuple((quad + 0.5).flatten()), Image.BILINEAR)
  if output_size < transform_size:
    img = img.resize((output_size, output_size), Image.LANCZOS)

  # The same square in the photo's own pixel centres.
  photo_quad = (quad + offset + 0.5) * scale - 0.5
  return Aligned(image=np.asarray(img), quad=photo_quad)


def align_faces(models, photo, output_size, which="largest", *,
                transform_size=None, upsample=1, min_score=MIN_SCORE,
                min_size=0):
  """Detects, selects ('largest' or 'all') and FFHQ-aligns the faces of a
  photo: [Aligned] with `.face` set, left to right ([] without a face)."""
  found = select(detect(models, photo, upsample=upsample, min_score=min_score,
                        min_size=min_size), which)
  return [dataclasses.replace(
      align(photo, f.landmarks, output_size, transform_size=transform_size),
      face=f) for f in found]


def aligned_to_photo(quad, size):
  """(2, 3) affine matrix: pixel centres of a size² image covering the
  aligned square → photo pixel centres.

  The aligned square is a (rotated) square in the photo, so the map is
  affine: pixel (x, y) sits at (x + 0.5, y + 0.5) / size of the way along
  the square's top and left edges.
  """
  q = np.asarray(quad, np.float64)
  ex = (q[3] - q[0]) / size
  ey = (q[1] - q[0]) / size
  t = q[0] + 0.5 * (ex + ey)
  return np.stack([np.array([ex[0], ey[0], t[0]]),
                   np.array([ex[1], ey[1], t[1]])])


def photo_landmarks(quad, size, points):
  """Points (N, 2) of a size² aligned image → photo coordinates."""
  m = aligned_to_photo(quad, size)
  return np.asarray(points, np.float64) @ m[:, :2].T + m[:, 2]


# --------------------------------------------------------------------------
# Paste-back


def feathered_mask(size, feather=0.1):
  """(size, size) float32 blending weight over the aligned square: 1 inside,
  falling smoothly (smoothstep) to 0 over `feather` × size at the edges, so
  pasted results leave no seam."""
  c = (np.arange(size, dtype=np.float64) + 0.5) / size
  d = np.minimum(c, 1.0 - c)  # distance to the nearer edge, in sides
  if feather <= 0:
    r = np.ones(size)
  else:
    r = np.clip(d / feather, 0.0, 1.0)
    r = r * r * (3.0 - 2.0 * r)
  return np.minimum(r[:, None], r[None, :]).astype(np.float32)


def _to_float255(image):
  a = np.asarray(image)
  if a.dtype == np.uint8:
    return a.astype(np.float32)
  # Generator outputs are in [-1, 1].
  return (np.clip(a.astype(np.float32), -1.0, 1.0) + 1.0) * 127.5


def paste(photo, image, quad, *, mask=None, feather=0.1):
  """Puts an aligned-frame image back into the photo at the photo's size.

  photo: (H, W, 3) uint8; image: (s, s, 3) uint8 or float in [-1, 1] at any
  size s (the generator's) covering the aligned square `quad`; mask:
  optional (s, s) or (s, s, 1) weights in the aligned frame (e.g. a parsing
  mask), multiplied into the feathered square. The image and the weight
  are sampled bilinearly through the inverse alignment; photo pixels with
  weight 0 are returned bit-identical.

  Returns (pasted (H, W, 3) uint8, weight (H, W) float32).
  """
  photo = _rgb_u8(photo)
  h, w = photo.shape[:2]
  img = _to_float255(image)
  s = img.shape[0]
  if img.shape != (s, s, 3):
    raise ValueError(f"image must be (s, s, 3), got {img.shape}")
  weight = feathered_mask(s, feather)
  if mask is not None:
    mask = np.asarray(mask, np.float32).reshape(s, s)
    weight = weight * mask
  m = aligned_to_photo(quad, s)
  # Only the photo pixels the square can reach (one pixel of bilinear
  # support around it) are computed.
  corners = np.asarray(quad, np.float64)
  x0 = int(max(np.floor(corners[:, 0].min()) - 1, 0))
  y0 = int(max(np.floor(corners[:, 1].min()) - 1, 0))
  x1 = int(min(np.ceil(corners[:, 0].max()) + 2, w))
  y1 = int(min(np.ceil(corners[:, 1].max()) + 2, h))
  out = photo.copy()
  full = np.zeros((h, w), np.float32)
  if x1 <= x0 or y1 <= y0:
    return out, full
  local = m.copy()
  local[:, 2] -= (x0, y0)
  stack = np.concatenate([img, weight[..., None]], -1)
  warped = np.asarray(alignment.warp_affine(
      jnp.asarray(stack[None]), jnp.asarray(local[None], jnp.float32),
      (y1 - y0, x1 - x0))[0], np.float64)
  alpha = np.clip(warped[..., 3], 0.0, 1.0)
  region = out[y0:y1, x0:x1].astype(np.float64)
  blended = alpha[..., None] * warped[..., :3] + (1 - alpha[..., None]) * region
  blended = np.clip(np.floor(blended + 0.5), 0, 255).astype(np.uint8)
  touched = alpha > 0
  out[y0:y1, x0:x1][touched] = blended[touched]
  full[y0:y1, x0:x1] = alpha
  return out, full


def paste_all(photo, pastes, feather=0.1):
  """Pastes several (image, quad[, mask]) into one photo, in order.

  Returns (pasted uint8, weight (H, W) float32: the largest weight any of
  them had at each pixel)."""
  out = _rgb_u8(photo)
  total = np.zeros(out.shape[:2], np.float32)
  for item in pastes:
    image, quad = item[0], item[1]
    mask = item[2] if len(item) > 2 else None
    out, w = paste(out, image, quad, mask=mask, feather=feather)
    total = np.maximum(total, w)
  return out, total


# --------------------------------------------------------------------------
# Identity


def face_descriptor(models, image, landmarks68=None, **detect_kwargs):
  """dlib's 128-d face descriptor of a uint8 image, or None without a face.

  landmarks68: use this face's landmarks instead of detecting one, so two
  pixel-aligned images (an input and its inversion) are described from the
  same face chip.
  """
  dlib = _dlib()
  if models.recognizer is None:
    raise ValueError("load_models(recognition=True) for face descriptors")
  img = _rgb_u8(image)
  if landmarks68 is None:
    faces = select(detect(models, img, **detect_kwargs), "largest")
    if not faces:
      return None
    landmarks68 = faces[0].landmarks
  lm = np.rint(np.asarray(landmarks68, np.float64)).astype(int)
  rect = dlib.rectangle(int(lm[:, 0].min()), int(lm[:, 1].min()),
                        int(lm[:, 0].max()), int(lm[:, 1].max()))
  shape = dlib.full_object_detection(
      rect, [dlib.point(int(x), int(y)) for x, y in lm])
  return np.asarray(models.recognizer.compute_face_descriptor(img, shape),
                    np.float64)


def cosine(a, b):
  a = np.asarray(a, np.float64)
  b = np.asarray(b, np.float64)
  return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def id_dlib(models, a, b, landmarks68=None, **detect_kwargs):
  """Identity similarity: cosine of dlib's face descriptors of a and b.

  With `landmarks68` (usually the input's) both descriptors use that face
  chip; otherwise each image's own largest face. NaN when either has no
  face. (Not the paper's CurricularFace similarity, a different network.)
  """
  da = face_descriptor(models, a, landmarks68, **detect_kwargs)
  db = face_descriptor(models, b, landmarks68, **detect_kwargs)
  if da is None or db is None:
    return float("nan")
  return cosine(da, db)
