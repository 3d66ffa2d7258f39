"""Hybrid refinement on a synthetic case whose answer is known.

    python bench/refine_synthetic.py                        # 64², 4 images, 100/50 steps
    python bench/refine_synthetic.py --code-noise 0.3 --images 2 --steps 40

The generator is a random stand-in whose RGB outputs are scaled to a std
of 0.4 (`tame`). The target is x = G(w_true) with a foreign patch (a crop of the
`skimage.data` astronaut, a photograph a small random stand-in generator
cannot draw) pasted at a known square; the mask is exact: 1 (in-domain)
outside the patch, 0 on it. The refinement starts from codes w_true (plus
Gaussian W+ noise of `--code-noise` × the spread of W, to mimic an imperfect
coarse inversion) and runs each mode: hybrid, weight (m = 1), feature
(m = 0), next to "none" (the codes with the original generator).

Printed per mode (means over images):
  * PSNR (dB, peak-to-peak 2, unclipped) and LPIPS-Alex of the final image
    against x, in-domain (outside the patch) and out-of-domain (the patch);
    LPIPS is the mean of the layer-summed, bilinearly upsampled LPIPS map
    over the region (`LPIPS.error_map`), not the training loss;
  * the weight deviation ‖θ* − θ‖ over the synthesis weights, also relative
    to ‖θ‖;
  * editing fidelity for `--directions` seeded random directions d (one W
    direction for every layer, of length `--edit-scale` × the mean distance
    of a code from the average code; 0.2 is about an InterFaceGAN edit of
    α = 3 on FFHQ, where that distance is ~15–20): PSNR and LPIPS on the in-domain area between the refined edit
    G(codes + d; θ*, o, m_f) and the ground-truth edit G(w_true + d; θ);
    and the PSNR of the patch under the edit against the pasted patch (does
    the out-of-domain detail survive editing).
"""
import argparse
import dataclasses
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402


def tame(G, std=0.4, n=16):
  """G with its RGB outputs scaled to a standard deviation of `std`.

  A randomly initialised generator draws images of std ~1.8 (half the
  pixels outside [-1, 1]), unlike a trained one and unlike the pasted
  photograph. The image is a sum of ToRGB outputs (linear in their weights
  and biases), so scaling those scales the image.
  """
  z = jax.random.normal(jax.random.PRNGKey(123), (n, G.z_dim))
  w = jnp.repeat(G.mapping(G.params, z)[:, None], G.n_latent, axis=1)
  s = std / float(jnp.std(jax.jit(G.synthesis)(G.params, w)))
  syn = dict(G.params["synthesis"])
  for name in syn:
    if name.startswith("to_rgb"):
      layer = dict(syn[name])
      layer["bias"] = layer["bias"] * s
      layer["conv"] = dict(layer["conv"], weight=layer["conv"]["weight"] * s)
      syn[name] = layer
  return dataclasses.replace(G, params=dict(G.params, synthesis=syn))


def make_cases(G, n, seed, patch_fraction):
  """(w_true (n, n_latent, d), targets (n, H, W, 3), clean G(w_true),
  masks (n, H, W, 1) with 1 = in-domain)."""
  from PIL import Image
  from skimage import data
  size = G.config["size"]
  rng = np.random.RandomState(seed)
  z = jnp.asarray(rng.standard_normal((n, G.z_dim)), jnp.float32)
  w = G.mapping(G.params, z)
  w_true = jnp.repeat(w[:, None], G.n_latent, axis=1)
  clean = np.asarray(jax.jit(G.synthesis)(G.params, w_true))
  targets, masks = clean.copy(), np.ones((n, size, size, 1), np.float32)
  p = max(4, int(round(size * patch_fraction)))
  photo = data.astronaut()
  for i in range(n):
    y0, x0 = rng.randint(0, size - p + 1, size=2)
    top, left = rng.randint(0, 200), rng.randint(100, 200)
    crop = Image.fromarray(photo[top:top + 260, left:left + 260]).resize(
        (p, p), Image.LANCZOS)
    targets[i, y0:y0 + p, x0:x0 + p] = np.asarray(crop, np.float32) / 127.5 - 1
    masks[i, y0:y0 + p, x0:x0 + p] = 0.0
  return w_true, jnp.asarray(targets), clean, jnp.asarray(masks)


def region_psnr(x, y, region):
  """PSNR over the pixels where region (…, 1) is 1, peak-to-peak 2 (the
  [-1, 1] range); not clipped, so an exact reproduction scores 120 dB."""
  se = ((np.asarray(x, np.float64) - np.asarray(y, np.float64)) / 2.0) ** 2
  r = np.broadcast_to(np.asarray(region, bool), se.shape)
  return float(10 * np.log10(1.0 / max(np.mean(se[r]), 1e-12)))


def region_lpips(alex, x, y, region):
  maps = np.asarray(alex.error_map(alex.params, x, y))
  return float(np.sum(maps * region) / np.sum(region))


COLUMNS = ("psnr_in", "psnr_out", "lpips_in", "lpips_out", "weight_dev",
           "weight_dev_rel", "edit_psnr", "edit_lpips", "patch_psnr")


def run(argv=None):
  """Runs the benchmark, prints its table and returns {mode: {column: mean}}."""
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--size", type=int, default=64)
  ap.add_argument("--channels", type=int, default=64)
  ap.add_argument("--style-dim", type=int, default=64)
  ap.add_argument("--images", type=int, default=4)
  ap.add_argument("--seed", type=int, default=0)
  ap.add_argument("--steps", type=int, default=100, help="feature steps")
  ap.add_argument("--weight-steps", type=int, default=None,
                  help="default: half of --steps (the paper's 50 of 100)")
  ap.add_argument("--feature-idx", type=int, default=None,
                  help="default: the size/8 map, as 11 is at 1024²")
  ap.add_argument("--patch", type=float, default=3 / 8,
                  help="patch side as a fraction of the image side")
  ap.add_argument("--code-noise", type=float, default=0.0,
                  help="W+ noise on the starting codes, × the spread of W")
  ap.add_argument("--directions", type=int, default=3)
  ap.add_argument("--edit-scale", type=float, default=0.2)
  ap.add_argument("--modes", default="none,hybrid,weight,feature")
  args = ap.parse_args(argv)

  from dhr_jax import refine
  from dhr_jax.models import lpips
  from dhr_jax.models.stylegan2 import init_generator
  G = init_generator(jax.random.PRNGKey(args.seed), size=args.size,
                     style_dim=args.style_dim, n_mlp=2,
                     channels=args.channels)
  G = tame(G)
  k = (args.feature_idx if args.feature_idx is not None
       else 2 * (int(np.log2(args.size)) - 5) + 1)
  ws = args.steps // 2 if args.weight_steps is None else args.weight_steps
  alex = lpips.load("alex")
  w_true, target, clean, mask = make_cases(G, args.images, args.seed + 1,
                                           args.patch)
  # The spread of W: per coordinate (code noise) and the mean distance of a
  # code from the average code (edit lengths).
  z = jax.random.normal(jax.random.PRNGKey(args.seed + 2),
                        (4096, G.z_dim))
  w = np.asarray(G.mapping(G.params, z), np.float64)
  w_std = jnp.asarray(w.std(0), jnp.float32)
  radius = float(np.mean(np.linalg.norm(w - w.mean(0), axis=1)))
  rng = np.random.RandomState(args.seed + 3)
  codes = w_true + args.code_noise * w_std * jnp.asarray(
      rng.standard_normal(w_true.shape), jnp.float32)
  dirs = []
  for _ in range(args.directions):
    n = rng.standard_normal(args.style_dim)
    dirs.append(jnp.asarray(args.edit_scale * radius * n / np.linalg.norm(n),
                            jnp.float32))
  inside, patch = np.asarray(mask), 1.0 - np.asarray(mask)

  synth = jax.jit(lambda p, c, o, m: G.synthesis(p, c, feature_idx=k,
                                                  offset=o, mask=m))
  plain = jax.jit(G.synthesis)
  truth_edits = [np.asarray(plain(G.params, w_true + d)) for d in dirs]
  theta = jax.tree_util.tree_leaves(G.params["synthesis"])
  theta_norm = float(np.sqrt(sum(np.sum(np.asarray(x, np.float64) ** 2)
                                 for x in theta)))

  print(f"device: {jax.devices()[0].device_kind}; generator {args.size}², "
        f"{args.channels} channels, style_dim {args.style_dim} (random "
        f"stand-in); feature_idx {k} "
        f"({refine.feature_resolution(k)}²); {args.images} images, patch "
        f"{args.patch:.3f} of the side; steps {args.steps}/{ws}; code noise "
        f"{args.code_noise}; {args.directions} edit directions × "
        f"{args.edit_scale}", flush=True)
  header = (f"{'mode':>8} | {'PSNR in':>7} {'PSNR out':>8} | {'LPIPS in':>8} "
            f"{'LPIPS out':>9} | {'‖θ*−θ‖':>8} {'rel':>8} | {'edit PSNR':>9} "
            f"{'edit LPIPS':>10} {'patch PSNR':>10} | {'time s':>6}")
  print(header)
  print("-" * len(header))
  results = {}
  for mode in args.modes.split(","):
    t0 = time.perf_counter()
    if mode == "none":
      params = jax.tree_util.tree_map(
          lambda x: jnp.broadcast_to(x, (args.images,) + x.shape), G.params)
      image = np.asarray(plain(G.params, codes))
      offset = mask_f = None
    else:
      r = refine.hybrid_refine(G, codes, target, mask, feature_idx=k,
                               feature_steps=args.steps, weight_steps=ws,
                               mode=mode, lpips_alex=alex)
      params, image = r.params, np.asarray(r.image)
      offset, mask_f = r.offset, r.mask_feature
    elapsed = time.perf_counter() - t0
    rows = []
    for i in range(args.images):
      p_i = jax.tree_util.tree_map(lambda x: x[i], params)
      dev = float(np.sqrt(sum(
          np.sum((np.asarray(a, np.float64) - np.asarray(b, np.float64)) ** 2)
          for a, b in zip(jax.tree_util.tree_leaves(p_i["synthesis"]),
                          theta))))
      x, m_in, m_out = target[i:i + 1], inside[i:i + 1], patch[i:i + 1]
      e_psnr, e_lpips, e_patch = [], [], []
      for d, truth in zip(dirs, truth_edits):
        c = codes[i:i + 1] + d
        if mode == "none":
          edited = plain(p_i, c)
        else:
          edited = synth(p_i, c, offset[i:i + 1], mask_f[i:i + 1])
        e_psnr.append(region_psnr(edited, truth[i:i + 1], m_in))
        e_lpips.append(region_lpips(alex, edited, truth[i:i + 1], m_in))
        e_patch.append(region_psnr(edited, x, m_out))
      rows.append([
          region_psnr(image[i:i + 1], x, m_in),
          region_psnr(image[i:i + 1], x, m_out),
          region_lpips(alex, jnp.asarray(image[i:i + 1]), x, m_in),
          region_lpips(alex, jnp.asarray(image[i:i + 1]), x, m_out),
          dev, dev / theta_norm, np.mean(e_psnr), np.mean(e_lpips),
          np.mean(e_patch)])
    v = np.mean(np.asarray(rows), axis=0)
    results[mode] = dict(zip(COLUMNS, map(float, v)))
    print(f"{mode:>8} | {v[0]:7.2f} {v[1]:8.2f} | {v[2]:8.4f} {v[3]:9.4f} | "
          f"{v[4]:8.3f} {v[5]:8.2e} | {v[6]:9.2f} {v[7]:10.4f} {v[8]:10.2f} | "
          f"{elapsed:6.1f}", flush=True)
  return results


def main(argv=None):
  run(argv)
  return 0


if __name__ == "__main__":
  sys.exit(main())
