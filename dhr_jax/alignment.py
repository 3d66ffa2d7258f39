"""Face alignment for the FaRL parser: five landmarks → facer's 448² frame and back.

Coordinates are pixel centres: pixel (row i, column j) sits at (x, y) = (j, i),
so an image of width W spans x in [-0.5, W - 0.5]. With that convention the
bilinear sampler below is PyTorch's `grid_sample(align_corners=False,
padding_mode='zeros')`, and warping to the frame and back reproduces any
affine intensity ramp exactly wherever no sample falls outside either image.

Landmarks are (x, y) in the order left eye, right eye, nose tip, left mouth
corner, right mouth corner, "left" meaning the image's left.
"""
import jax
import jax.numpy as jnp
import numpy as np

# The five landmarks of an average FFHQ-aligned face in a 512² image (the
# template the FFHQ/CelebA-HQ alignment produces; eyes ≈ a quarter of the
# width apart, a little above the centre).
FFHQ_LANDMARKS_512 = np.array([
    [192.98138, 239.94708],
    [318.90277, 240.19360],
    [256.63416, 314.01935],
    [201.26117, 371.41043],
    [313.08905, 371.15118],
], np.float32)

# facer's standard face in [-1, 1]² (defined in a 512² frame as
# [196, 226], [316, 226], [256, 286], [220, 360.4], [292, 360.4] / 256 - 1).
_FACER_STANDARD = np.array([
    [196.0, 226.0],
    [316.0, 226.0],
    [256.0, 286.0],
    [220.0, 360.4],
    [292.0, 360.4],
], np.float32) / 256.0 - 1.0

# facer's celebm/448 setting: 448² frame, standard face scaled by 0.8, plain
# affine crop (tanh warp factor 0).
FRAME_SIZE = 448
CELEBM_FACE_SCALE = 0.8


def ffhq_landmarks(size):
  """The canonical FFHQ five landmarks for a square aligned image of `size`²."""
  s = size / 512.0
  # Scale about pixel edges, not centres, so every resolution shows the same face.
  return (FFHQ_LANDMARKS_512 + 0.5) * s - 0.5


def frame_landmarks(frame_size=FRAME_SIZE, face_scale=CELEBM_FACE_SCALE):
  """Where facer puts the five landmarks in its `frame_size`² crop."""
  return ((_FACER_STANDARD * face_scale + 1.0) * (frame_size - 1) / 2.0
          ).astype(np.float32)


def similarity_matrix(src, dst):
  """Least-squares similarity (rotation, uniform scale, shift) taking src → dst.

  src, dst: (..., N, 2) point sets. Returns (..., 2, 3) matrices M with
  dst ≈ M @ [x, y, 1]. No reflection, as in facer's alignment.
  """
  src = jnp.asarray(src, jnp.float32)
  dst = jnp.asarray(dst, jnp.float32)
  ms = src.mean(-2, keepdims=True)
  md = dst.mean(-2, keepdims=True)
  s = src - ms
  d = dst - md
  norm = jnp.sum(s * s, axis=(-2, -1))
  # Closed form of the 2-D Procrustes fit: dst = [[a, b], [-b, a]] src + t.
  a = jnp.sum(d * s, axis=(-2, -1)) / norm
  b = jnp.sum(d[..., 0] * s[..., 1] - d[..., 1] * s[..., 0], axis=-1) / norm
  tx = md[..., 0, 0] - a * ms[..., 0, 0] - b * ms[..., 0, 1]
  ty = md[..., 0, 1] + b * ms[..., 0, 0] - a * ms[..., 0, 1]
  row0 = jnp.stack([a, b, tx], -1)
  row1 = jnp.stack([-b, a, ty], -1)
  return jnp.stack([row0, row1], -2)


def invert_affine(m):
  """Inverse of (..., 2, 3) affine matrices."""
  lin = m[..., :2]
  inv = jnp.linalg.inv(lin)
  t = -jnp.einsum("...ij,...j->...i", inv, m[..., 2])
  return jnp.concatenate([inv, t[..., None]], -1)


def apply_affine(m, points):
  """Applies (..., 2, 3) matrices to (..., N, 2) points."""
  return jnp.einsum("...ij,...nj->...ni", m[..., :2], points) + m[..., None, :, 2]


def face_to_frame(landmarks, frame_size=FRAME_SIZE,
                  face_scale=CELEBM_FACE_SCALE):
  """(B, 5, 2) image landmarks → (B, 2, 3) matrices image → parser frame."""
  return similarity_matrix(landmarks, frame_landmarks(frame_size, face_scale))


def bilinear_sample(image, coords):
  """Samples `image` (H, W, C) at `coords` (..., 2) = (x, y) pixel centres.

  Bilinear, zeros outside the image, never antialiased: the same numbers as
  `torch.nn.functional.grid_sample(..., align_corners=False)`.
  """
  h, w = image.shape[:2]
  x = coords[..., 0]
  y = coords[..., 1]
  x0 = jnp.floor(x)
  y0 = jnp.floor(y)
  fx = x - x0
  fy = y - y0
  x0 = x0.astype(jnp.int32)
  y0 = y0.astype(jnp.int32)
  out = 0.0
  for dy, wy in ((0, 1.0 - fy), (1, fy)):
    for dx, wx in ((0, 1.0 - fx), (1, fx)):
      xi = x0 + dx
      yi = y0 + dy
      inside = (xi >= 0) & (xi < w) & (yi >= 0) & (yi < h)
      v = image[jnp.clip(yi, 0, h - 1), jnp.clip(xi, 0, w - 1)]
      out = out + v * jnp.where(inside, wx * wy, 0.0)[..., None]
  return out


def _pixel_grid(height, width):
  ys, xs = jnp.meshgrid(jnp.arange(height, dtype=jnp.float32),
                        jnp.arange(width, dtype=jnp.float32), indexing="ij")
  return jnp.stack([xs, ys], -1)


def _resample(images, out_to_in, out_size):
  grid = _pixel_grid(*out_size)  # (h, w, 2)
  def one(image, m):
    src = jnp.einsum("ij,hwj->hwi", m[:, :2], grid) + m[:, 2]
    return bilinear_sample(image, src)
  return jax.vmap(one)(images, out_to_in)


def warp_affine(images, matrices, out_size):
  """Output pixel q of each image takes images at matrices^-1 q.

  images: (B, H, W, C); matrices: (B, 2, 3) mapping input pixel coordinates to
  output pixel coordinates; out_size: (height, width). Zeros outside.
  """
  return _resample(images, invert_affine(matrices), out_size)


def warp_to_frame(images, matrices, frame_size=FRAME_SIZE):
  """Crops each face into the parser frame: (B, H, W, C) → (B, S, S, C)."""
  return warp_affine(images, matrices, (frame_size, frame_size))


def warp_from_frame(frames, matrices, image_size, frame_size=FRAME_SIZE):
  """Puts frame-space maps back into image space (inverse of `warp_to_frame`).

  frames: (B, s, s, C) maps covering the `frame_size`² frame at any
  resolution s (the parser's logits are 512² for a 448² frame);
  image_size: (height, width). Pixels whose frame position falls outside the
  frame get zeros, as facer's inverse grid sample does.
  """
  res = frames.shape[1]
  # image pixel → frame pixel → pixel of the s² map over the same area.
  scale = res / frame_size
  to_map = jnp.concatenate(
      [matrices[..., :2] * scale,
       (matrices[..., 2:] + 0.5) * scale - 0.5], -1)
  return _resample(frames, to_map, image_size)


# --------------------------------------------------------------------------
# The identity network's 112² crop (GANInverter's MTCNN alignment)

IDENTITY_CROP_SIZE = 112

# get_reference_facial_points(default_square=True) of the official MTCNN
# alignment: the 96×112 template's five points (eye centres, nose tip, mouth
# corners) shifted 8 px right to centre them in a 112² square.
IDENTITY_REFERENCE_112 = np.array([
    [30.29459953, 51.69630051],
    [65.53179932, 51.50139999],
    [48.02519989, 71.73660278],
    [33.54930115, 92.3655014],
    [62.72990036, 92.20410156],
]) + np.array([8.0, 0.0])


def _cp2tform_nonreflective(uv, xy):
  """MATLAB cp2tform's 'nonreflective similarity' fit as the official
  matlab_cp2tform computes it: least squares for the map xy → uv, inverted.
  Returns the 3×3 matrix T in row-vector form ([x y 1] = [u v 1] T)."""
  x, y = xy[:, :1], xy[:, 1:]
  m = xy.shape[0]
  ones, zeros = np.ones((m, 1)), np.zeros((m, 1))
  a = np.vstack([np.hstack([x, y, ones, zeros]),
                 np.hstack([y, -x, zeros, ones])])
  b = np.vstack([uv[:, :1], uv[:, 1:]])
  if np.linalg.matrix_rank(a) < 4:
    raise ValueError("a similarity transform needs two distinct landmarks")
  sc, ss, tx, ty = np.squeeze(np.linalg.lstsq(a, b, rcond=None)[0])
  t = np.linalg.inv(np.array([[sc, -ss, 0.0], [ss, sc, 0.0], [tx, ty, 1.0]]))
  t[:, 2] = (0.0, 0.0, 1.0)
  return t


def _row_apply(t, uv):
  return (np.hstack([uv, np.ones((uv.shape[0], 1))]) @ t)[:, :2]


def identity_transform(points, reference=IDENTITY_REFERENCE_112):
  """(2, 3) matrix image → 112² crop, as the official alignment finds it.

  The official `warp_and_crop_face` (align_type 'similarity') calls
  matlab_cp2tform's `get_similarity_transform_for_cv2(src, ref,
  reflective=True)`: the best non-reflective similarity and the best one
  composed with a mirror are both fitted, and the one with the smaller
  residual is kept. The residuals are measured against the reference with
  its x negated (the official code negates the reference in place before
  measuring), which this reproduces; for any face whose points are in
  their usual order the non-reflective fit wins, mirrored point sets get
  the mirror. points (5, 2) (x, y) pixels in image order (float32, as the
  official code casts them); float64 arithmetic as numpy's.
  """
  uv = np.asarray(points, np.float32)
  xy = np.asarray(reference, np.float32).copy()
  t1 = _cp2tform_nonreflective(uv, xy)
  xy[:, 0] = -xy[:, 0]   # the reference both residuals are measured against
  t2 = _cp2tform_nonreflective(uv, xy) @ np.diag([-1.0, 1.0, 1.0])
  norm1 = np.linalg.norm(_row_apply(t1, uv) - xy)
  norm2 = np.linalg.norm(_row_apply(t2, uv) - xy)
  t = t1 if norm1 <= norm2 else t2
  return t[:, :2].T


def identity_crops(images, points, size=IDENTITY_CROP_SIZE):
  """The official 112² identity crops of uint8 images, as float32 grey levels.

  images: (B, H, W, 3) with values in [0, 255] (uint8 photos or inversions
  quantised as saved); points: (B, 5, 2) five landmarks per image. Each
  crop is cv2.warpAffine's default (bilinear, constant zero border) of the
  image through `identity_transform`, rounded to integers as cv2 writes
  uint8 (round half to even). Returns (B, size, size, 3) float32 in
  [0, 255]; `/ 127.5 - 1` gives the network's input.
  """
  points = np.asarray(points)
  m = np.stack([identity_transform(p) for p in points]).astype(np.float32)
  crops = warp_affine(jnp.asarray(images, jnp.float32), jnp.asarray(m),
                      (size, size))
  return jnp.clip(jnp.round(crops), 0.0, 255.0)
