"""Domain-specific segmentation on a synthetic case with known ground truth.

The target is an image of a small random stand-in generator, G(w), with a
foreign patch (the astronaut from `skimage.data`) pasted at a known place.
DSS should mark the patch out-of-domain and keep the rest in-domain. Prints,
for the adaptive (Otsu) and the fixed face thresholds: the recall of the
patch as out-of-domain, the IoU of the out-of-domain mask with the patch, and
the fraction of the rest kept in-domain, plus timings.

  python bench/dss_bench.py [--size 64] [--seeds 0 1 2] [--steps 40]
"""
import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image


def make_case(size, seed):
  """(G, target (1, size, size, 3), clean G(w), patch mask (size, size))."""
  from skimage import data
  from dhr_jax.models.stylegan2 import init_generator
  G = init_generator(jax.random.PRNGKey(seed), size=size, style_dim=64,
                     n_mlp=2, channels=64)
  z = jax.random.normal(jax.random.PRNGKey(seed + 1), (1, 64))
  w = G.mapping(G.params, z)
  clean = np.asarray(jax.jit(G.synthesis)(
      G.params, jnp.repeat(w[:, None], G.n_latent, 1)))
  n = size // 3
  crop = Image.fromarray(data.astronaut()[20:260, 150:390]).resize(
      (n, n), Image.BILINEAR)
  y0, x0 = size // 6, size // 2
  target = clean.copy()
  target[0, y0:y0 + n, x0:x0 + n] = np.asarray(crop, np.float32) / 127.5 - 1
  gt = np.zeros((size, size), bool)
  gt[y0:y0 + n, x0:x0 + n] = True
  return G, target, clean, gt


# Small images: the deepest LPIPS map (size/16) leaves most superpixels no
# pixel; officially they would score NaN and all be out-of-domain.
SMALL = {"vanished_superpixels": "own_pixels"}


def scores(mask, gt):
  out = mask[0, ..., 0] == 0
  recall = float(np.mean(out[gt]))
  iou = float(np.sum(out & gt) / max(np.sum(out | gt), 1))
  rest = float(np.mean(~out[~gt]))
  return recall, iou, rest


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--size", type=int, default=64)
  ap.add_argument("--seeds", type=int, nargs="+", default=[0])
  ap.add_argument("--steps", type=int, default=40,
                  help="coarse inversion steps")
  args = ap.parse_args()

  from dhr_jax.models import lpips
  from dhr_jax import segmentation as S
  vgg = lpips.load("vgg")
  print(f"backend={jax.default_backend()} size={args.size} "
        f"coarse_steps={args.steps}")
  print("seed  coarse      threshold  recall  IoU    rest-in  K    secs")
  for seed in args.seeds:
    G, target, clean, gt = make_case(args.size, seed)
    t0 = time.time()
    r = S.domain_specific_segmentation(
        target, G=G, key=jax.random.PRNGKey(100 + seed), lpips_vgg=vgg,
        config={"adaptive": True, "coarse_steps": args.steps, **SMALL})
    secs = time.time() - t0
    runs = [("inversion", "otsu", r, secs)]
    for coarse_name, coarse in (("inversion", r.coarse), ("exact G(w)", clean)):
      for name, adaptive in (("otsu", True), ("fixed 0.7", False)):
        if coarse_name == "inversion" and adaptive:
          continue
        t0 = time.time()
        rr = S.domain_specific_segmentation(target, coarse=coarse,
                                            lpips_vgg=vgg,
                                            config={"adaptive": adaptive,
                                                    **SMALL})
        runs.append((coarse_name, name, rr, time.time() - t0))
    for coarse_name, name, rr, secs in runs:
      recall, iou, rest = scores(rr.mask, gt)
      k = int(np.isfinite(rr.scores[0]).sum())
      print(f"{seed:<5} {coarse_name:<11} {name:<10} {recall:6.3f}  "
            f"{iou:5.3f}  {rest:7.3f}  {k:<4} {secs:6.1f}")


if __name__ == "__main__":
  main()
