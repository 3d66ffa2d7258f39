"""The demo's synthetic inputs, whose truth is known, and scores against it.

A synthetic image is a generator image with a foreign patch pasted at a
known place: DSS should call the patch out-of-domain and the rest
in-domain, and an edit should follow the generator's own edit of the true
codes outside the patch.
"""
import dataclasses
import os

import jax.numpy as jnp
import numpy as np
from PIL import Image
import skimage.data

from dhr_jax import edits as edits_lib
from dhr_jax import files
from dhr_jax import segmentation
from dhr_jax.metrics import psnr
from dhr_jax.models import encoders
from dhr_jax.models import hfgi

# The scores of `ground_truth_metrics` (metrics.csv's columns on synthetic
# inputs).
GT_METRICS = ("gt_recall", "gt_iou", "gt_rest_in", "psnr_in_embed",
              "psnr_in", "psnr_out_embed", "psnr_out")


@dataclasses.dataclass(frozen=True)
class GroundTruth:
  """What a synthetic input is made of.

  out: (H, W) bool, True on the pasted (out-of-domain) patch; codes:
  (n_latent, style_dim), the W+ codes the generator drew the rest from.
  """
  out: np.ndarray
  codes: np.ndarray


def synthetic_case(G, seed, index, patch_fraction=1 / 3):
  """A generator image with a foreign patch at a known place.

  G(w) for a seeded z, with a crop of the `skimage.data` astronaut (a real
  photograph, far from what a small random generator draws) pasted over a
  square of side patch_fraction·size at a seeded position. Returns
  (target uint8 (H, W, 3), `GroundTruth`). Deterministic in (G, seed,
  index).
  """
  rng = np.random.RandomState([seed, index])
  size = G.config["size"]
  z = jnp.asarray(rng.standard_normal((1, G.z_dim)), jnp.float32)
  w = G.mapping(G.params, z)
  wplus = jnp.repeat(w[:, None], G.n_latent, 1)
  clean = G.synthesis(G.params, wplus)
  target = segmentation.to_uint8(clean)[0]
  n = max(4, int(round(size * patch_fraction)))
  y0, x0 = (int(v) for v in rng.randint(0, size - n + 1, size=2))
  photo = skimage.data.astronaut()
  top, left = rng.randint(0, 200), rng.randint(100, 200)
  crop = Image.fromarray(photo[top:top + 260, left:left + 260]).resize(
      (n, n), Image.LANCZOS)
  target[y0:y0 + n, x0:x0 + n] = np.asarray(crop)
  gt = np.zeros((size, size), bool)
  gt[y0:y0 + n, x0:x0 + n] = True
  return target, GroundTruth(out=gt, codes=np.asarray(wplus[0]))


def write_inputs(config, workdir, G):
  """Writes the demo's synthetic targets to OUT/inputs (once) → (dir,
  {name: GroundTruth})."""
  s = config.data.synthetic
  directory = os.path.join(workdir, "inputs")
  gt = {}
  for i in range(int(s.count)):
    name = f"synthetic_{i}"
    target, gt[name] = synthetic_case(G, int(s.seed), i,
                                      float(s.patch_fraction))
    path = os.path.join(directory, name + ".png")
    data = files.png_bytes(target)
    if not os.path.isfile(path) or open(path, "rb").read() != data:
      files.write_bytes(path, data)
  return directory, gt


def ground_truth_metrics(image, embedded, target, mask, truth):
  """How well DSS and the refinement did on a synthetic image (one image).

  truth: its `GroundTruth`. Returns the recall of the patch as
  out-of-domain, the IoU of the out-of-domain mask with it, the fraction of
  the rest kept in-domain, and PSNR inside and outside the patch for the
  embedding alone and after refinement.
  """
  out = np.asarray(mask)[..., 0] < 0.5
  gt = np.asarray(truth.out, bool)
  return dict(
      gt_recall=float(np.mean(out[gt])),
      gt_iou=float(np.sum(out & gt) / max(np.sum(out | gt), 1)),
      gt_rest_in=float(np.mean(~out[~gt])),
      psnr_in_embed=_region_psnr(embedded, target, ~gt),
      psnr_in=_region_psnr(image, target, ~gt),
      psnr_out_embed=_region_psnr(embedded, target, gt),
      psnr_out=_region_psnr(image, target, gt))


def _region_psnr(x, reference, region):
  # Both as pictures are seen: clipped to [-1, 1].
  clip = lambda a: np.clip(np.asarray(a, np.float32), -1, 1)
  d = ((clip(x) - clip(reference)) / 2.0) ** 2
  return psnr(float(np.mean(d[region])))


def edit_fidelity(G, truth, edits, rendered):
  """How closely one image's edits follow the true ones (synthetic inputs).

  The true edit of a synthetic image is the generator's own image of its
  edited true codes, G(e(w_true)) (no patch: the patch is not the
  generator's to edit). rendered: {label: (H, W, 3)} the method's edits of
  `edits`. Returns {'edit_psnr_in': PSNR (dB) outside the patch, mean over
  the edits}; {} without edits.
  """
  true = edits_lib.generator_edits(G, np.asarray(truth.codes)[None], edits)
  keep = ~np.asarray(truth.out, bool)
  if not true:
    return {}
  return dict(edit_psnr_in=float(np.mean([
      _region_psnr(rendered[l], true[l], keep) for l in true])))



# The stand-in encoders' head scales (`encoders.init_encoder`): on the
# compare demo's 64² stand-in generator they put the codes 0.099 (e4e),
# 0.070 (pSp) and, after ReStyle's 5 iterations (each adds about as much),
# 0.24 (std) from latent_avg, whose own std is 0.33 (measured): codes near
# the generator's average, apart from each other. At scale 1 ReStyle's
# iterations ran off to 35.
STAND_IN_HEAD_SCALES = dict(e4e=0.25, psp=0.25, restyle=0.02)


# The compare demo's stand-in encoders by name: LSAP is an e4e network
# trained with another loss (GANInverter ships it in e4e's layout), so its
# stand-in is an e4e with weights of its own.
STAND_IN_ARCHS = dict(e4e="e4e", psp="psp", restyle="restyle", lsap="e4e")
# Each stand-in's random stream [seed, index]: 0-2 the architectures' own
# (e4e, pSp, ReStyle, as before LSAP and HFGI joined), then HFGI's, LSAP's.
_STREAMS = dict(e4e=0, psp=1, restyle=2, hfgi=3, lsap=4)


def stand_in_encoder(G, name, seed):
  """A seeded random encoder for the stand-in generator G, built in memory
  (the compare demo's, no weights): name one of STAND_IN_ARCHS ('e4e',
  'psp', 'restyle', 'lsap'), the real architecture, its input at G's size
  (up to 256²), its codes offsets from G's latent_avg."""
  arch = STAND_IN_ARCHS[name]
  avg = np.tile(np.asarray(G.latent_avg, np.float32)[None], (G.n_latent, 1))
  return encoders.init_encoder(
      [int(seed), _STREAMS[name]], arch, G.config["size"], avg,
      input_size=min(G.config["size"], 256),
      head_scale=STAND_IN_HEAD_SCALES[arch])


# The stand-in HFGI's head scale (`hfgi.init_hfgi`): on the compare demo's
# 64² stand-in generator and synthetic image, from the stand-in e4e's codes,
# scale and shift have std 0.25 and 0.35 against the hooked 4² feature's
# 0.76, and the HFGI image is 22.6 dB PSNR from the e4e inversion (measured;
# at 0.03: 0.75, 1.05 and 16.0 dB; at 1, 25 and 35: a new image): random
# weights can only perturb the inversion they consult, and do so a little,
# as the stand-in encoders' codes stay near latent_avg.
STAND_IN_HFGI_HEAD_SCALE = 0.01


HFGI_STAND_IN_ONLY = (
    "config.model.hfgi='stand-in': the stand-in HFGI is the stand-in "
    "generator's (model.checkpoint='stand-in', the demo); name a converted "
    "HFGI checkpoint (python -m converters.hfgi)")


def stand_in_hfgi(G, seed, head_scale=STAND_IN_HFGI_HEAD_SCALE):
  """A seeded random HFGI for the stand-in generator G, built in memory (the
  compare demo's "HFGI (e4e)" row, no weights): the released architecture
  sized for G (`hfgi.config_for`: the official hook's analogue, its input at
  G's size up to 256²), its scale and shift small so that its image stays
  near the e4e inversion it consults."""
  config = hfgi.config_for(G.config["size"], G.config["channels"])
  return hfgi.init_hfgi([int(seed), _STREAMS["hfgi"]], config,
                        head_scale)
