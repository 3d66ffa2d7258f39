"""The paper's identity metric: CurricularFace similarity of aligned crops.

GANInverter's `scripts/calc_id_loss.py` (the ID column of DHR's tables)
reads the saved inversion and the target, finds five landmarks on each
image separately with MTCNN, crops each to 112² with the official
similarity alignment, embeds both crops with CurricularFace's IR-101 and
reports the dot product of the l2-normalised embeddings; a pair where
either image shows no face is left out of the mean.

`id_curricularface` does the same with one difference: the five landmarks
come from dlib (the `faces` extra's HOG detector and 68-point predictor:
eye centres, nose tip, mouth corners, `faces.five_points`) instead of MTCNN,
found on each image separately as the official script does. The crop
(`alignment.identity_crops`) and the network are the official ones.
"""
import jax.numpy as jnp
import numpy as np

from dhr_jax import alignment
from dhr_jax import faces
from dhr_jax import io


def saved_uint8(images):
  """Float images in [-1, 1] as GANInverter saves an inversion
  (`utils.common.tensor2im`: clipped to [0, 1], × 255 in float32, then
  truncated to uint8); uint8 images pass unchanged."""
  x = np.asarray(images)
  if x.dtype == np.uint8:
    return x
  x = (x.astype(np.float32) + np.float32(1)) / np.float32(2)
  return (np.clip(x, 0, 1) * np.float32(255)).astype(np.uint8)


def _target_uint8(images):
  # A target read from a file is x = u8 / 127.5 - 1; rounding gives its
  # pixels back.
  x = np.asarray(images)
  return x if x.dtype == np.uint8 else io.to_uint8(x)


def five_landmarks(models, image):
  """dlib's five points (5, 2) of the image's largest face, or None."""
  found = faces.select(faces.detect(models, image), "largest")
  return found[0].five if found else None


def similarity(net, images, targets, image_points, target_points):
  """Dot products (B,) of the IR-101 embeddings of each image's and each
  target's 112² crop. images, targets: (B, H, W, 3) uint8; points:
  (B, 5, 2) landmarks of each."""
  a = alignment.identity_crops(images, image_points) / 127.5 - 1.0
  b = alignment.identity_crops(targets, target_points) / 127.5 - 1.0
  emb = net.embed(net.params, jnp.concatenate([a, b], 0))
  n = a.shape[0]
  return np.asarray(jnp.sum(emb[:n] * emb[n:], -1), np.float64)


def id_curricularface(net, images, targets, models, *, image_points=None,
                      target_points=None):
  """The paper's ID similarity of each inversion with its target.

  net: `load_id_network(DIR)`; images: inversions (B, H, W, 3), floats in
  [-1, 1] (quantised as GANInverter saves them, `saved_uint8`) or uint8;
  targets: the same shape, floats in [-1, 1] read from uint8 files, or
  uint8; models: `faces.load_models(recognition=False)`. Landmarks are
  found with dlib on every image separately unless given ((B, 5, 2)).
  Returns (B,) float64, NaN where an image shows no face.
  """
  images = saved_uint8(images)
  targets = _target_uint8(targets)
  n = images.shape[0]
  if image_points is None:
    image_points = [five_landmarks(models, im) for im in images]
  if target_points is None:
    target_points = [five_landmarks(models, t) for t in targets]
  out = np.full(n, np.nan)
  ok = [i for i in range(n)
        if image_points[i] is not None and target_points[i] is not None]
  if ok:
    out[ok] = similarity(net, images[ok], targets[ok],
                         np.stack([image_points[i] for i in ok]),
                         np.stack([target_points[i] for i in ok]))
  return out


COLUMN = "id_curricularface"


def metrics(net, models, target, image):
  """{'id_curricularface': similarity} of one inversion with its target
  (H, W, 3 each), or {} when either shows no face (the official script
  leaves such a pair out)."""
  v = id_curricularface(net, np.asarray(image)[None],
                        np.asarray(target)[None], models)[0]
  return {} if np.isnan(v) else {COLUMN: float(v)}
