"""Domain-Specific Segmentation (DSS): which pixels the generator can explain.

DHR tunes the generator's weights on in-domain pixels and a feature offset on
out-of-domain ones; this module decides which is which (paper Sec. 3.2):

1. Coarse inversion: a short W-space optimisation (40 steps from the mean
   latent) gives an image the generator *can* make; LPIPS-VGG between it and
   the input, kept as per-layer spatial maps, says where it falls short.
2. SLIC superpixels (`n_segments=200, compactness=30, sigma=1`, labels from
   1) of the uint8 image in BGR channel order, as the official code runs
   SLIC on `cv2.imread`'s array. SLIC's Lab conversion then sees red and
   blue swapped; `slic_channels="rgb"` runs it on the true colours instead
   (on the golden 256² face crop the labels then agree with the official
   ones on only about half of the pixels).
3. Score of superpixel i = Σ_l mean of LPIPS map l inside the superpixel's
   mask, the mask nearest-resized (PyTorch 'nearest': source index
   ⌊dst·in/out⌋) to the map's resolution. A superpixel that vanishes at a
   layer's resolution (no pixel left there) scores NaN, the official 0/0,
   and so is out-of-domain (NaN < θ is false); `result.scores` keeps the
   NaN. `vanished_superpixels="own_pixels"` instead reads that layer's map,
   nearest-upsampled, at the superpixel's own pixels (small superpixels are
   then judged rather than always left out).
4. In-domain when score < θ[class(i)], class(i) = the parsing class with the
   largest summed probability inside the superpixel (the first on ties); θ
   is 0.7 for `face`, 0.8 for the ten inner-face classes and 0.6 for the
   rest (config).
5. Parsing mask: out-of-domain where P(background) + P(cloth) + P(hat) +
   P(earr) + P(neckl) ≥ 0.5.
6. mask = superpixel mask × parsing mask (1 = in-domain).

The parsing comes from a parser model (anything with `.params` and
`.parse(params, images) → (B, H, W, 19)` probabilities, e.g. the FaRL port),
from user label maps (CelebAMask-HQ class-id PNGs), or is absent: then one
threshold (`config.single_threshold`) serves every superpixel and there is no
parsing mask. `config.adaptive = True` replaces the thresholds by Otsu's
threshold over each image's superpixel scores, for domains whose LPIPS scale
differs from faces (Otsu always splits, so it also marks the worst-explained
superpixels of a fully in-domain image; keep it off for faces).

No face: an image whose `landmarks` row is all NaN (no face was found) gets
the official "no face detected" fallback: its probabilities are zeros, so it
has no parsing mask (ones) and every superpixel is class 0 (`background`,
θ = 0.6). The parser still runs on the whole batch, with the canonical FFHQ
landmarks standing in for the NaN ones (it must not see NaN), and those
images' probabilities are then discarded.

Named variants of the official behaviour, all off by default:
`slic_channels="rgb"` (step 2), `vanished_superpixels="own_pixels"` (step 3;
needed on small images, where the deepest LPIPS map, size/16, leaves most
superpixels no pixel), `adaptive=True` (Otsu, above).

Coarse inversion and LPIPS run batched on the accelerator; SLIC and the
per-superpixel bookkeeping (vectorised with bincount) run per image on host.
"""
import dataclasses
from typing import Any, Optional

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from dhr_jax import alignment
from dhr_jax.models import lpips as lpips_lib
from dhr_jax.io import resize_target, to_uint8
from dhr_jax.models.farl import CELEBM_LABELS
from dhr_jax.models.ops import resize_nearest

# CelebAMask-HQ 19-class parsing, in the order of the parser's channels.
CELEBAMASK_LABELS = CELEBM_LABELS
_INNER_FACE = ("rr", "lr", "rb", "lb", "re", "le", "nose", "imouth", "llip",
               "ulip")


def default_config():
  """The official DSS settings; override fields to adapt them."""
  thresholds = {name: 0.6 for name in CELEBAMASK_LABELS}
  thresholds["face"] = 0.7
  thresholds.update({name: 0.8 for name in _INNER_FACE})
  return ml_collections.ConfigDict(dict(
      coarse_steps=40,
      n_segments=200,
      compactness=30.0,
      sigma=1.0,
      # Per parsing class θ: a superpixel is in-domain when its score < θ.
      thresholds=thresholds,
      # Without any parsing, every superpixel is compared with this value.
      single_threshold=0.7,
      # Pixels whose summed probability over these classes reaches
      # `parsing_threshold` are out-of-domain whatever their superpixel says.
      out_of_domain_classes=("background", "cloth", "hat", "earr", "neckl"),
      parsing_threshold=0.5,
      # Otsu over the superpixel scores instead of the fixed thresholds.
      adaptive=False,
      # Channel order SLIC sees: "bgr" as the official code (OpenCV's array),
      # "rgb" the true colours.
      slic_channels="bgr",
      # A superpixel with no pixel at an LPIPS map's resolution: "nan" scores
      # NaN and is out-of-domain (official); "own_pixels" reads that map,
      # upsampled, at the superpixel's own pixels.
      vanished_superpixels="nan",
  ))


# The allowed values of the config's named variants (official one first).
CHOICES = {"slic_channels": ("bgr", "rgb"),
           "vanished_superpixels": ("nan", "own_pixels")}


def _config(config):
  base = default_config()
  if config is None:
    return base
  overrides = config.to_dict() if hasattr(config, "to_dict") else dict(config)
  unknown = sorted(set(overrides) - set(base))
  if unknown:
    raise ValueError(f"unknown DSS config fields {unknown}; known: "
                     f"{sorted(base)}")
  if "thresholds" in overrides:
    bad = sorted(set(overrides["thresholds"]) - set(CELEBAMASK_LABELS))
    if bad:
      raise ValueError(f"thresholds for unknown classes {bad}; classes are "
                       f"{CELEBAMASK_LABELS}")
    base.thresholds.update(overrides.pop("thresholds"))
  for name, choices in CHOICES.items():
    if name in overrides and overrides[name] not in choices:
      raise ValueError(f"DSS config {name}={overrides[name]!r}; choose one of "
                       f"{choices}")
  base.update(overrides)
  return base


@jax.jit
def _lpips_maps(lpips, x, y):
  # The metric is a pytree: one program per net and shapes, its weights
  # arguments.
  return lpips.spatial(lpips.params, x, y)


@dataclasses.dataclass
class DSSResult:
  """Everything DSS computed, batch-first, as numpy arrays.

  Per-superpixel arrays are (B, K) with K the largest superpixel count in the
  batch; column k is the superpixel labelled k + 1 in `superpixels`, and
  columns past an image's own count are NaN (scores, thresholds) or -1
  (classes). By default a superpixel that vanishes at an LPIPS map's
  resolution also scores NaN (module doc, step 3).
  """
  mask: np.ndarray               # (B, H, W, 1) float32, 1 = in-domain
  superpixel_mask: np.ndarray    # (B, H, W, 1) float32
  parsing_mask: np.ndarray       # (B, H, W, 1) float32, ones without parsing
  coarse: np.ndarray             # (B, H, W, 3) coarse inversion in [-1, 1]
  error_map: np.ndarray          # (B, H, W, 1) Σ of upsampled LPIPS maps
  lpips_maps: list               # [(B, h_l, w_l, 1)] per VGG layer
  superpixels: np.ndarray        # (B, H, W) int32 SLIC labels from 1
  boundaries: np.ndarray         # (B, H, W) bool superpixel boundaries
  scores: np.ndarray             # (B, K) float32
  classes: np.ndarray            # (B, K) int32 parsing class, -1 without
  thresholds: np.ndarray         # (B, K) float32 θ each superpixel met
  parsing: Optional[np.ndarray]  # (B, H, W, 19) probabilities or None
  coarse_codes: Any = None       # the coarse inversion's latent codes


# ------------------------------------------------------------- small steps

def slic_superpixels(image_uint8, config=None):
  """SLIC labels (H, W) int32 from 1 for one uint8 RGB image (H, W, 3).

  The image is handed to SLIC in `config.slic_channels` order (default BGR,
  as the official code).
  """
  from skimage.segmentation import slic
  c = _config(config)
  if image_uint8.dtype != np.uint8 or image_uint8.ndim != 3:
    raise ValueError("slic_superpixels expects one (H, W, 3) uint8 image, got "
                     f"{image_uint8.dtype} {image_uint8.shape}")
  if c.slic_channels == "bgr":
    image_uint8 = np.ascontiguousarray(image_uint8[..., ::-1])
  labels = slic(image_uint8, n_segments=c.n_segments,
                compactness=c.compactness, sigma=c.sigma, start_label=1,
                channel_axis=-1)
  return labels.astype(np.int32)


def superpixel_scores(maps, labels, vanished="nan"):
  """Σ_l masked mean of map l inside each superpixel.

  maps: per-layer maps of ONE image, each (h_l, w_l) or (h_l, w_l, 1);
  labels: (H, W) ints ≥ 1. Returns (K,) float64 for labels 1..K = max label;
  labels that do not occur get NaN. vanished: a label with no pixel left at
  a map's resolution scores NaN ("nan", the official 0/0) or takes that
  map's mean at its own pixels, the map nearest-upsampled ("own_pixels").
  """
  if vanished not in CHOICES["vanished_superpixels"]:
    raise ValueError(f"vanished={vanished!r}; choose one of "
                     f"{CHOICES['vanished_superpixels']}")
  labels = np.asarray(labels)
  k = int(labels.max())
  flat = labels.ravel()
  full_count = np.bincount(flat, minlength=k + 1)
  total = np.zeros(k + 1)
  for m in maps:
    m = np.asarray(m, np.float64)
    m = m[..., 0] if m.ndim == 3 else m
    small = resize_nearest(labels, m.shape, axes=(0, 1)).ravel()
    count = np.bincount(small, minlength=k + 1)
    mean = np.bincount(small, weights=m.ravel(), minlength=k + 1) / np.maximum(
        count, 1)
    empty = count == 0
    if empty.any() and vanished == "nan":
      mean = np.where(empty, np.nan, mean)
    elif empty.any():
      # The superpixel vanished at this resolution: read the layer at the
      # superpixel's own pixels instead.
      up = resize_nearest(m, labels.shape, axes=(0, 1)).ravel()
      full = np.bincount(flat, weights=up, minlength=k + 1) / np.maximum(
          full_count, 1)
      mean = np.where(empty, full, mean)
    total += mean
  total[full_count == 0] = np.nan
  return total[1:]


def superpixel_classes(probs, labels):
  """Class with the largest summed probability per superpixel: (K,) int32.

  probs: (H, W, C) of ONE image; labels: (H, W) ints ≥ 1. Labels that do not
  occur get -1.
  """
  # float64 sums: the official float32 ones can only differ on near-ties.
  labels = np.asarray(labels).ravel()
  probs = np.asarray(probs, np.float64)
  k = int(labels.max())
  sums = np.stack([np.bincount(labels, weights=probs[..., c].ravel(),
                               minlength=k + 1)
                   for c in range(probs.shape[-1])], axis=-1)
  classes = np.argmax(sums, axis=-1).astype(np.int32)
  classes[np.bincount(labels, minlength=k + 1) == 0] = -1
  return classes[1:]


def class_thresholds(config=None, labels=CELEBAMASK_LABELS):
  """θ per parsing channel (C,) in the order of `labels`."""
  c = _config(config)
  return np.asarray([c.thresholds[name] for name in labels], np.float64)


def otsu_threshold(scores):
  """Otsu's threshold over the finite superpixel scores of one image."""
  from skimage.filters import threshold_otsu
  s = np.asarray(scores, np.float64)
  s = s[np.isfinite(s)]
  if s.size == 0:
    raise ValueError("no superpixel scores to threshold")
  return float(threshold_otsu(s))


def superpixel_mask(labels, scores, thresholds, inclusive=False):
  """(H, W) float32: 1 where the pixel's superpixel has score < θ.

  scores, thresholds: (K,) for labels 1..K (thresholds may be a scalar).
  inclusive: use score ≤ θ (Otsu's convention: above θ is the upper class).
  """
  scores = np.asarray(scores, np.float64)
  thr = np.broadcast_to(np.asarray(thresholds, np.float64), scores.shape)
  keep = scores <= thr if inclusive else scores < thr
  keep = np.concatenate([[False], keep])  # label 0 never occurs in SLIC output
  return keep[np.asarray(labels)].astype(np.float32)


def parsing_mask(probs, config=None, labels=CELEBAMASK_LABELS):
  """(..., H, W, 1) float32: 0 where P(out-of-domain classes) ≥ threshold."""
  c = _config(config)
  idx = [labels.index(name) for name in c.out_of_domain_classes]
  p_out = np.asarray(probs, np.float32)[..., idx].sum(-1, keepdims=True)
  return (p_out < c.parsing_threshold).astype(np.float32)


# ------------------------------------------------------------- label maps

def load_label_maps(sources, size, num_classes=len(CELEBAMASK_LABELS)):
  """User parsing → one-hot (B, H, W, C) float32 at image size `size`.

  sources: a list of PNG paths (single-channel images of class ids, as the
  CelebAMask-HQ label maps; 3-channel PNGs with equal channels are accepted)
  or an int array (B, h, w). Maps of another size with the same aspect ratio
  (CelebAMask-HQ labels are 512² for 1024² images) are nearest-resized.
  """
  if isinstance(sources, np.ndarray) and sources.ndim == 3:
    maps = [(f"label map {i}", sources[i]) for i in range(len(sources))]
  else:
    maps = [(str(s), _read_label_png(s)) if isinstance(s, (str, bytes)) or
            hasattr(s, "__fspath__") else (f"label map {i}", np.asarray(s))
            for i, s in enumerate(sources)]
  out = []
  for name, m in maps:
    if m.ndim != 2:
      raise ValueError(f"{name}: a label map is (H, W) class ids, got shape "
                       f"{m.shape}")
    if not np.issubdtype(m.dtype, np.integer):
      if not np.all(np.equal(np.mod(m, 1), 0)):
        raise ValueError(f"{name}: label values must be integer class ids")
      m = m.astype(np.int64)
    lo, hi = int(m.min()), int(m.max())
    if lo < 0 or hi >= num_classes:
      raise ValueError(
          f"{name}: class ids must lie in 0..{num_classes - 1} (CelebAMask-HQ "
          f"order {', '.join(CELEBAMASK_LABELS)}), found {lo}..{hi}; save the "
          "label map as class ids, not a colour visualisation")
    if tuple(m.shape) != tuple(size):
      if m.shape[0] * size[1] != m.shape[1] * size[0]:
        raise ValueError(
            f"{name}: label map is {m.shape[0]}×{m.shape[1]} but the image is "
            f"{size[0]}×{size[1]} (different aspect ratio); give label maps of "
            "the image's size")
      m = resize_nearest(m, size, axes=(0, 1))
    out.append(np.eye(num_classes, dtype=np.float32)[m])
  return np.stack(out)


def _read_label_png(path):
  import os
  from PIL import Image
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"label map {path} not found")
  try:
    with Image.open(path) as im:
      mode = im.mode
      a = np.asarray(im)
  except Exception as e:
    raise ValueError(f"{path}: not a readable image ({e})") from None
  if a.ndim == 3:
    if a.shape[-1] >= 3 and np.array_equal(a[..., 0], a[..., 1]) and (
        np.array_equal(a[..., 0], a[..., 2])):
      return a[..., 0]
    raise ValueError(
        f"{path}: a {mode} colour image; label maps must be single-channel "
        "PNGs of class ids 0..18 (CelebAMask-HQ), not a colour "
        "visualisation")
  return a


# ------------------------------------------------------------- the whole step

def domain_specific_segmentation(target, *, G=None, key=None, coarse=None,
                                 coarse_codes=None, lpips_vgg=None,
                                 parser=None, label_maps=None, landmarks=None,
                                 config=None):
  """In-domain / out-of-domain mask of `target` and all its parts.

  Args:
    target: (B, H, W, 3) images in [-1, 1].
    G: the generator for the coarse inversion (with `key`); not needed when
      `coarse` is given.
    key: PRNG key of the coarse inversion.
    coarse: (B, H, W, 3) coarse inversion computed elsewhere (skips step 1;
      the official code's is `coarse_inversion(...).last_step_image`);
      `coarse_codes` are then passed through to the result.
    lpips_vgg: a loaded `lpips.load('vgg')` (loaded here when None).
    parser: parsing model with `.params` and `.parse(params, images)` →
      (B, H, W, 19) probabilities (e.g. the FaRL parser).
    label_maps: instead of a parser, CelebAMask-HQ class-id PNG paths (one
      per image) or an int array (B, h, w).
    landmarks: (B, 5, 2) passed to the parser for unaligned images; an
      all-NaN row means no face was found in that image: it gets the
      official fallback (no parsing mask, every superpixel class 0), and
      `result.parsing` is zeros there.
    config: overrides of `default_config()` (ConfigDict or dict).

  Returns:
    A `DSSResult`; `result.mask` is (B, H, W, 1), 1 = in-domain.
  """
  c = _config(config)
  target = jnp.asarray(target, jnp.float32)
  if target.ndim != 4 or target.shape[-1] != 3:
    raise ValueError(f"target must be (B, H, W, 3) in [-1, 1], got "
                     f"{target.shape}")
  b, h, w, _ = target.shape
  if parser is not None and label_maps is not None:
    raise ValueError("give either a parser or label_maps, not both")
  if lpips_vgg is None:
    lpips_vgg = lpips_lib.load("vgg")

  # 1. Coarse inversion and LPIPS-VGG maps, batched.
  if coarse is None:
    if G is None or key is None:
      raise ValueError("domain_specific_segmentation needs G and key for the "
                       "coarse inversion, or a precomputed `coarse` image")
    from dhr_jax import embedding
    # The official coarse inversion's target: the input resized to 256².
    inv = embedding.coarse_inversion(G, resize_target(target), lpips_vgg,
                                     key=key, steps=c.coarse_steps)
    # The official DSS reads the last step's image, before its update.
    coarse, coarse_codes = inv.last_step_image, inv.codes
  coarse = jnp.asarray(coarse, jnp.float32)
  if coarse.shape != target.shape:
    raise ValueError(f"coarse image {coarse.shape} must match the target "
                     f"{target.shape} (full resolution)")
  maps = _lpips_maps(lpips_vgg, coarse, target)
  error_map = lpips_lib.upsampled_sum(maps, (h, w))
  maps = [np.asarray(m) for m in maps]

  # Parsing probabilities at image resolution, if any.
  if parser is not None:
    no_face = np.zeros(b, bool)
    if landmarks is not None:
      landmarks = np.array(landmarks, np.float32)
      if landmarks.shape != (b, 5, 2):
        raise ValueError(f"landmarks must be ({b}, 5, 2), one row of five "
                         f"(x, y) points per image, got {landmarks.shape}")
      missing = np.isnan(landmarks)
      no_face = missing.all(axis=(1, 2))
      if (missing.any(axis=(1, 2)) & ~no_face).any():
        raise ValueError("landmarks with some NaN points: give all five "
                         "points, or all NaN for an image without a face")
      # The parser must not see NaN; these images' probabilities are dropped.
      landmarks[no_face] = alignment.ffhq_landmarks(min(h, w))
    args = (parser.params, target) + ((landmarks,) if landmarks is not None
                                      else ())
    probs = parser.parse(*args)
    names = tuple(getattr(parser, "labels", CELEBAMASK_LABELS))
    if probs.shape[-1] != len(CELEBAMASK_LABELS) or names != CELEBAMASK_LABELS:
      raise ValueError(f"the parser's classes {names} are not the 19 "
                       "CelebAMask-HQ classes DSS thresholds refer to")
    if probs.shape[1:3] != (h, w):
      probs = jax.image.resize(probs, (b, h, w, probs.shape[-1]), "bilinear")
    probs = np.array(probs, np.float32)
    # The official "no face detected" branch: zero probabilities, hence a
    # parsing mask of ones and class 0 (argmax of zeros) everywhere.
    probs[no_face] = 0.0
  elif label_maps is not None:
    if len(label_maps) != b:
      raise ValueError(f"{len(label_maps)} label maps for {b} images; give "
                       "one per image")
    probs = load_label_maps(label_maps, (h, w))
  else:
    probs = None

  # 2-4. Superpixels and their scores, per image on host.
  images = to_uint8(target)
  theta = class_thresholds(c)
  labels, scores, classes, thresholds = [], [], [], []
  for i in range(b):
    lab = slic_superpixels(images[i], c)
    s = superpixel_scores([m[i] for m in maps], lab,
                          vanished=c.vanished_superpixels)
    cls = (superpixel_classes(probs[i], lab) if probs is not None
           else np.full(s.shape, -1, np.int32))
    if c.adaptive:
      thr = np.full(s.shape, otsu_threshold(s))
    elif probs is not None:
      thr = np.where(cls >= 0, theta[np.maximum(cls, 0)], np.nan)
    else:
      thr = np.full(s.shape, c.single_threshold)
    labels.append(lab)
    scores.append(s)
    classes.append(cls)
    thresholds.append(thr)

  sp_mask = np.stack([superpixel_mask(l, s, t, inclusive=c.adaptive)
                      for l, s, t in zip(labels, scores, thresholds)])[..., None]
  # 5-6. Parsing mask and the final mask.
  p_mask = (parsing_mask(probs, c) if probs is not None
            else np.ones((b, h, w, 1), np.float32))
  from skimage.segmentation import find_boundaries
  k = max(len(s) for s in scores)
  pad = lambda rows, fill, dtype: np.stack([
      np.concatenate([r, np.full(k - len(r), fill)]).astype(dtype)
      for r in rows])
  return DSSResult(
      mask=sp_mask * p_mask,
      superpixel_mask=sp_mask,
      parsing_mask=p_mask,
      coarse=np.asarray(coarse),
      error_map=np.asarray(error_map),
      lpips_maps=maps,
      superpixels=np.stack(labels),
      boundaries=np.stack([find_boundaries(l) for l in labels]),
      scores=pad(scores, np.nan, np.float32),
      classes=pad(classes, -1, np.int32),
      thresholds=pad(thresholds, np.nan, np.float32),
      parsing=probs,
      coarse_codes=coarse_codes)
