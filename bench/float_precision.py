"""How far float32 results are from float64 ones: the figures behind the
numeric bounds of the test suite.

    python bench/float_precision.py                 # every part (~1 h, 2 cores)
    python bench/float_precision.py --part stylegan2_64   # ~20 min
    python bench/float_precision.py --part refine         # ~15-40 min
    python bench/float_precision.py --part refine_tiny|embedding|primitives
    python bench/float_precision.py --part refine_map     # ~30-60 min

Each part evaluates one computation of the tests twice, in float32 (as the
tests do) and in float64 (jax x64, each in its own process), from the same
float32 inputs, and prints their distances (relative L2 unless said):

stylegan2_64 (tests/test_stylegan2.py::test_parity_64): the 64² golden
  fixture's forward values and the gradients of its loss mean(img · R). R has
  random signs, so every gradient is a sum of terms that mostly cancel;
  printed for each: |f32 − f64|, |fixture − f64| (the fixture's own float32
  error, from the PyTorch CPU run) and |f32 − fixture| (what the test checks).

refine (tests/test_run.py::test_two_device_sharded_run_equals_single_device):
  the small hybrid refinement of tests/test_run.py (32² generator, feature
  index 3, 4 feature / 2 weight steps, LPIPS-Alex + MSE) on its four input
  images, run as vmapped batches of two (one device) and image by image
  (each of two devices refines one), in float32, and in float64. Printed: the
  refined state (weights, offset), the re-rendered image and the metrics of
  run.py's table, between the two float32 programs and of each against
  float64, next to the float32 error of one forward pass of the start.

refine_tiny (tests/test_refine.py): the vmapped six-step loop against one
  jitted step per call, each against float64.

refine_map (refine.map_images; tests/test_refine.py::
  test_map_path_close_to_float64): the official loop of the dhr_refine_64
  fixture (its 64² stand-in generator, codes, target and mask, 6 feature /
  3 weight steps) with the FULL objective (MSE + LPIPS-Alex), batch 1 and a
  batch of 4 (the fixture's image and three variants: shifted codes, rolled
  target and mask). float32 through lax.map (the CPU default) and through
  vmap, both again with the target moved by ~1 ulp (×(1 + 1e-7·N(0, 1))),
  and float64; printed per image: relative L2 of the final image and offset
  against float64 and between the float32 programs. The ulp-perturbed run
  measures how much the loop amplifies one rounding of its input. Also
  printed: ∂(L_in, L_out)/∂image at the start, float32 against float64, and
  how much of that error sits in its 8 worst pixels (a max-pool window of
  AlexNet's first layer that picks another maximum in float32 routes its
  gradient to another pixel). float64 runs batch 4 only (~30 min).

embedding (tests/test_embedding.py): an image's W run in two batches, and
  W+ runs batched and one by one, against float64 (same random draws).

primitives (tests/test_embedding/e4e/farl/ops/lpips.py): resizes, pools,
  grid sampling, convolution gradients and LPIPS, ours and the reference
  library's, each against a float64 evaluation (maximum differences).
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.join(REPO, "tests"))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from conftest import rule_module, rel_l2  # noqa: E402


def _cast(tree, dtype):
  return jax.tree_util.tree_map(
      lambda x: jnp.asarray(x, dtype) if jnp.issubdtype(
          jnp.asarray(x).dtype, jnp.floating) else x, tree)


def _dtype():
  return jnp.float64 if jax.config.jax_enable_x64 else jnp.float32


def _precision(x64):
  """Switches to float64 once the float32 models are built (building them,
  the converters included, assumes float32)."""
  jax.config.update("jax_enable_x64", bool(x64))


# ------------------------------------------------------------ stylegan2_64

def _generator_64(tmp):
  import torch
  import dhr_jax
  from converters import stylegan2 as conv
  rule = rule_module()
  manifest, arrays = rule.load_golden(os.path.join(
      os.path.dirname(rule.__file__), "stylegan2_64.npz"))
  sd = rule.state_dict_from_manifest(manifest)
  torch.save({"g_ema": {k: torch.from_numpy(v) for k, v in sd.items()}},
             os.path.join(tmp, "g.pt"))
  assert conv.main(["--src", os.path.join(tmp, "g.pt"), "--dst",
                    os.path.join(tmp, "ckpt")]) == 0
  return dhr_jax.load_generator(os.path.join(tmp, "ckpt")), manifest, arrays


def stylegan2_64_values(tmp, x64):
  """The test's quantities in float32 or float64, as a dict of arrays."""
  from converters import stylegan2 as conv
  G, manifest, arrays = _generator_64(tmp)
  _precision(x64)
  dt = _dtype()
  k = manifest["meta"]["feature_idx"]
  nhwc = lambda x: jnp.asarray(np.transpose(x, (0, 2, 3, 1)), dt)
  params, noise = _cast(G.params, dt), _cast(list(G.noise), dt)
  wplus = jnp.asarray(arrays["wplus"], dt)
  offset, mask, R = (nhwc(arrays[n]) for n in ("offset", "mask", "R"))

  def loss_fn(params, wplus, offset):
    img = G.synthesis(params, wplus, noise, feature_idx=k, offset=offset,
                      mask=mask)
    return jnp.mean(img * R), img

  (loss, img), (g_params, g_wplus, g_offset) = jax.jit(jax.value_and_grad(
      loss_fn, argnums=(0, 1, 2), has_aux=True))(params, wplus, offset)
  out = {"loss": np.asarray(loss, np.float64),
         "image_with_feature": np.transpose(np.asarray(img, np.float64),
                                            (0, 3, 1, 2)),
         "grad_wplus": np.asarray(g_wplus, np.float64),
         "grad_offset": np.transpose(np.asarray(g_offset, np.float64),
                                     (0, 3, 1, 2))}
  for name, g in conv.flatten_official(g_params).items():
    out["sq/" + name] = np.sum(np.asarray(g, np.float64) ** 2)
  return out


def report_stylegan2_64(f32, f64):
  rule = rule_module()
  manifest, fixture = rule.load_golden(os.path.join(
      os.path.dirname(rule.__file__), "stylegan2_64.npz"))
  print("stylegan2_64: relative L2    f32-f64   fixture-f64  f32-fixture")
  for name in ("loss", "image_with_feature", "grad_wplus", "grad_offset"):
    print(f"  {name:22s} {rel_l2(f32[name], f64[name]):10.2e} "
          f"{rel_l2(fixture[name], f64[name]):12.2e} "
          f"{rel_l2(f32[name], fixture[name]):12.2e}")
  want = manifest["meta"]["param_grad_sq_sum"]
  total = np.sqrt(sum(want.values()))
  worst = {"other": [0.0, 0.0, 0.0, ""], "noise": [0.0, 0.0, 0.0, ""]}
  for name, w in want.items():
    a, b = float(f32["sq/" + name]), float(f64["sq/" + name])
    if w == 0.0:
      continue
    if name.endswith("noise.weight"):
      # Compared as gradient norms relative to the whole gradient's norm.
      e = [abs(np.sqrt(a) - np.sqrt(b)) / total,
           abs(np.sqrt(w) - np.sqrt(b)) / total,
           abs(np.sqrt(a) - np.sqrt(w)) / total]
      kind = "noise"
    else:
      e = [abs(a - b) / b, abs(w - b) / b, abs(a - w) / w]
      kind = "other"
    for i in range(3):
      if e[i] > worst[kind][i]:
        worst[kind][i] = e[i]
        if i == 2:
          worst[kind][3] = name
  print(f"  param grad Σg² (rel.)  {worst['other'][0]:10.2e} "
        f"{worst['other'][1]:12.2e} {worst['other'][2]:12.2e}  "
        f"(largest over non-noise entries; at {worst['other'][3]})")
  print(f"  noise-strength ‖g‖/‖G‖ {worst['noise'][0]:10.2e} "
        f"{worst['noise'][1]:12.2e} {worst['noise'][2]:12.2e}  "
        f"(largest; ‖G‖ = whole gradient's norm; at {worst['noise'][3]})")


# ----------------------------------------------------------------- refine

def _refine_case(tmp):
  """The refinement inputs of tests/test_run.py: its 32² generator, codes =
  latent_avg (its e4e encoder is zero), its four good input files, and
  masks from DSS with its settings (3 coarse steps, 16 superpixels)."""
  import test_run
  from dhr_jax import io, segmentation
  from dhr_jax.models import lpips
  from dhr_jax.models.stylegan2 import init_generator
  G = init_generator(jax.random.PRNGKey(0), size=32, style_dim=512, n_mlp=2,
                     channels=16)
  inputs = test_run.make_inputs(os.path.join(tmp, "inputs"))
  files = {os.path.splitext(f)[0]: f for f in os.listdir(inputs)}
  targets = np.stack([io.load_image(os.path.join(inputs, files[n]), 32)
                      for n in test_run.GOOD])
  small = dict(test_run.SMALL)
  dss = segmentation.domain_specific_segmentation(
      targets, G=G, key=jax.random.PRNGKey(0), lpips_vgg=lpips.load("vgg"),
      config={"coarse_steps": small["dss.coarse_steps"],
              "n_segments": small["dss.n_segments"]})
  codes = np.tile(np.asarray(G.latent_avg, np.float32)[None, None],
                  (len(targets), G.n_latent, 1))
  return G, codes, targets, np.asarray(dss.mask, np.float32)


def refine_values(tmp, x64):
  """Refined state, image and metrics: float32 runs batch-of-two and
  image-by-image; float64 only batch-of-two."""
  from dhr_jax import metrics, refine
  from dhr_jax.models import lpips
  G, codes, targets, masks = _refine_case(tmp)
  print("in-domain fractions of the masks:", masks.mean((1, 2, 3)))
  alex, vgg = lpips.load("alex"), lpips.load("vgg")
  _precision(x64)
  dt = _dtype()
  spec = refine.refine_spec(G, 3, "hybrid", alex.net)
  hyper = _cast(refine.make_hyper(), dt)
  params = _cast(G.params["synthesis"], dt)
  noise = _cast(list(G.noise), dt)
  l_params = _cast(alex.params, dt)

  def run(sl):
    p, o, mf, img, _, _ = refine.compiled_refinement(
        spec, 4, 2, params, jnp.asarray(codes[sl], dt),
        jnp.asarray(targets[sl], dt), jnp.asarray(masks[sl], dt), noise,
        l_params, hyper)
    return p, o, img

  def flat(p, o):
    return np.concatenate([np.ravel(np.asarray(x, np.float64))
                           for x in jax.tree_util.tree_leaves((p, o))])

  # The test's relative L2 also counts the unchanged mapping weights and
  # codes in the norm of the state.
  out = {"fixed_sq": np.asarray(
      [sum(float(np.sum(np.asarray(x, np.float64) ** 2)) for x in
           jax.tree_util.tree_leaves(G.params["mapping"]))
       + float(np.sum(codes[i].astype(np.float64) ** 2))
       for i in range(len(codes))])}
  first = G.synthesis(_cast(G.params, dt), jnp.asarray(codes, dt), noise)
  out["start_image"] = np.asarray(first, np.float64)
  # Batches of two as the one-device run (a, b), (c, e); one image per
  # program as each of two devices runs them.
  runs = {"batch": [run(slice(0, 2)), run(slice(2, 4))]}
  if dt == jnp.float32:
    runs["single"] = [run(slice(i, i + 1)) for i in range(4)]
  for name, parts in runs.items():
    states, images = [], []
    for p, o, img in parts:
      for i in range(img.shape[0]):
        states.append(flat(jax.tree_util.tree_map(lambda x: x[i], p), o[i]))
        images.append(np.asarray(img[i], np.float64))
    out[name + "_state"] = np.stack(states)
    out[name + "_image"] = np.stack(images)
    m = metrics.image_metrics(np.stack(images).astype(np.float32), targets,
                               masks, alex, vgg)
    out[name + "_metrics"] = np.asarray(
        [[r[k] for k in ("mse", "psnr", "lpips_alex", "lpips_vgg")]
         for r in m])
  return out


def report_refine(f32, f64):
  def worst(a, b):
    return max(rel_l2(x, y) for x, y in zip(a, b))

  def worst_as_test(a, b):
    return max(np.linalg.norm(x - y) / np.sqrt(np.sum(y ** 2) + c)
               for x, y, c in zip(a, b, f32["fixed_sq"]))

  print("refine (test_run's two-device check), worst over the four images:")
  print(f"  one forward pass of the start, f32 vs f64: image "
        f"{worst(f32['start_image'], f64['start_image']):.2e}")
  for a, b, label in (("batch", "single", "f32 batch vs f32 image-by-image"),
                      ("batch", "f64", "f32 batch vs f64"),
                      ("single", "f64", "f32 image-by-image vs f64")):
    x = f32[a + "_state"], f32[a + "_image"], f32[a + "_metrics"]
    src = f64 if b == "f64" else f32
    key = "batch" if b == "f64" else b
    y = src[key + "_state"], src[key + "_image"], src[key + "_metrics"]
    metric = np.max(np.abs(x[2] - y[2]) / np.maximum(1.0, np.abs(y[2])))
    print(f"  {label:34s} state {worst(x[0], y[0]):.2e} (as the test "
          f"counts it {worst_as_test(x[0], y[0]):.2e})  image "
          f"{worst(x[1], y[1]):.2e}  (max |Δ| {np.max(np.abs(x[1] - y[1])):.2e})"
          f"  metrics {metric:.2e} (|Δ| / max(1, |m|))")


# ------------------------------------------------------------- refine_map

def _refine_64_case(batch):
  """The dhr_refine_64 fixture's inputs (NHWC), batch 1 or the fixture's
  image followed by batch − 1 variants of it."""
  rule = rule_module()
  manifest, arrays = rule.load_golden(os.path.join(
      os.path.dirname(rule.__file__), "dhr_refine_64.npz"))
  nhwc = lambda x: np.transpose(x, (0, 2, 3, 1))
  codes, target = arrays["codes"], nhwc(arrays["target"])
  mask = nhwc(arrays["mask_full"])
  rs = np.random.RandomState(0)
  codes = np.concatenate([codes] + [
      codes + 0.3 * rs.randn(*codes.shape).astype(np.float32)
      for _ in range(batch - 1)])
  target = np.concatenate([target] + [np.roll(target, 7 * i, axis=2)
                                      for i in range(1, batch)])
  mask = np.concatenate([mask] + [np.roll(mask, 5 * i, axis=1)
                                  for i in range(1, batch)])
  return manifest["meta"], codes, target, mask


def refine_map_values(tmp, x64):
  from dhr_jax import refine
  from dhr_jax.models import lpips
  alex = lpips.load("alex")
  G = _generator_64(tmp)[0]
  cases = {b: _refine_64_case(b) for b in (1, 4)}
  _precision(x64)
  dt = _dtype()
  mapped = refine.map_images
  vmapped = lambda fn, *xs: jax.vmap(fn)(*xs)
  out = {}

  def run(name, batch, map_images, perturb=False):
    meta, codes, target, mask = cases[batch]
    if perturb:
      target = target * (1 + 1e-7 * np.random.RandomState(5).randn(
          *target.shape)).astype(np.float32)
    spec = refine.refine_spec(G, meta["feature_idx"], "hybrid", alex.net)
    hyper = _cast(refine.make_hyper(meta["weight_lr"], meta["feature_lr"],
                                    1.0, 1.0), dt)
    # The jitted loop is cached by shapes: a cached program would keep
    # the other path.
    refine.map_images = map_images
    refine.compiled_refinement.clear_cache()
    try:
      _, o, _, img, _, _ = refine.compiled_refinement(
          spec, meta["feature_steps"], meta["weight_steps"],
          _cast(G.params["synthesis"], dt), jnp.asarray(codes, dt),
          jnp.asarray(target, dt), jnp.asarray(mask, dt),
          _cast(list(G.noise), dt), _cast(alex.params, dt), hyper)
    finally:
      refine.map_images = mapped
      refine.compiled_refinement.clear_cache()
    out[name + "_image"] = np.asarray(img, np.float64)
    out[name + "_offset"] = np.asarray(o, np.float64)

  # ∂(L_in, L_out)/∂image at the start (the generator's own image), the
  # gradient every update starts from.
  meta, codes, target, mask = cases[1]
  spec = refine.refine_spec(G, meta["feature_idx"], "hybrid", alex.net)
  m_f = refine.area_pool(jnp.asarray(mask, dt),
                         refine.feature_resolution(meta["feature_idx"]))

  @jax.jit
  def start_grads(params, noise, lp, codes, target, mask):
    image = G.synthesis({"synthesis": params}, codes, noise)
    losses = lambda x: refine.refinement_losses(
        x, target, mask, m_f, 1.0, 1.0, lp, alex.net)
    _, back = jax.vjp(losses, image)
    one, zero = jnp.ones((), dt), jnp.zeros((), dt)
    return back((one, zero))[0], back((zero, one))[0]

  g_in, g_out = start_grads(
      _cast(G.params["synthesis"], dt), _cast(list(G.noise), dt),
      _cast(alex.params, dt), jnp.asarray(codes, dt), jnp.asarray(target, dt),
      jnp.asarray(mask, dt))
  out["start_grad_in"] = np.asarray(g_in, np.float64)
  out["start_grad_out"] = np.asarray(g_out, np.float64)
  if x64:
    run("b4", 4, mapped)  # images are independent: image 0 is batch 1's
    return out
  run("map_b1", 1, mapped)
  run("map_b4", 4, mapped)
  run("vmap_b1", 1, vmapped)
  run("vmap_b1_ulp", 1, vmapped, perturb=True)
  run("map_b1_ulp", 1, mapped, perturb=True)
  # vmap of 4 images with a weight copy each is slow on CPU (grouped
  # convolutions); batch 4 through vmap is left out.
  return out


def report_refine_map(f32, f64):
  print("refine_map (64², MSE + LPIPS-Alex, 6/3 steps): relative L2 per "
        "image, final image / offset")
  ref = {"image": f64["b4_image"], "offset": f64["b4_offset"]}
  rows = (("f32 lax.map, batch 1 vs f64", "map_b1", ref),
          ("f32 lax.map, batch 4 vs f64", "map_b4", ref),
          ("f32 vmap, batch 1 vs f64", "vmap_b1", ref),
          ("f32 vmap, target ±1 ulp, vs f64", "vmap_b1_ulp", ref),
          ("f32 lax.map vs vmap, batch 1", "map_b1",
           {k: f32["vmap_b1_" + k] for k in ("image", "offset")}),
          ("f32 vmap: target ±1 ulp vs exact", "vmap_b1_ulp",
           {k: f32["vmap_b1_" + k] for k in ("image", "offset")}),
          ("f32 lax.map: target ±1 ulp vs exact", "map_b1_ulp",
           {k: f32["map_b1_" + k] for k in ("image", "offset")}),
          ("f32 lax.map: image 0 of batch 4 vs 1", "map_b4",
           {k: f32["map_b1_" + k] for k in ("image", "offset")}))
  for name in ("in", "out"):
    a, b = f32["start_grad_" + name], f64["start_grad_" + name]
    err = np.sum((a - b) ** 2, -1).ravel()
    print(f"  ∂L_{name}/∂image at the start, f32 vs f64: "
          f"{rel_l2(a, b):.2e}; share of the squared error in its 8 worst "
          f"pixels {np.sort(err)[-8:].sum() / err.sum():.2f}")
  for label, a, b in rows:
    n = min(len(f32[a + "_image"]), len(b["image"]))
    vals = [f"{rel_l2(f32[a + '_image'][i], b['image'][i]):.2e} / "
            f"{rel_l2(f32[a + '_offset'][i], b['offset'][i]):.2e}"
            for i in range(n)]
    print(f"  {label:38s} " + "  ".join(vals))


# ---------------------------------------------- embedding and refine_tiny

def embedding_values(tmp, x64):
  """tests/test_embedding.py's two batching checks: W (16 steps) for images
  (0, 1) and (0, 2); W+ with MSE (12 steps) as a batch and one by one."""
  del tmp
  from dhr_jax.models import lpips
  from dhr_jax.embedding import (draw_batch, embed_batch, latent_stats,
                                 learning_rates, noise_levels)
  from dhr_jax.models.stylegan2 import init_generator
  G = init_generator(jax.random.PRNGKey(0), size=16, style_dim=32, n_mlp=2,
                     channels=32)
  L = lpips.load("vgg")
  targets = np.asarray(G(G.params, jax.random.normal(jax.random.PRNGKey(1),
                                                     (3, 32))))
  mean, std = (np.asarray(v) for v in latent_stats(G, jax.random.PRNGKey(2),
                                                   2000))
  keys_w = jax.random.split(jax.random.PRNGKey(3), 3)
  keys_p = jax.random.split(jax.random.PRNGKey(4), 2)
  _precision(x64)
  if x64:
    # The same random draws as in float32 (a float64 normal draws other
    # numbers from the same key): drawn in float32, then widened.
    normal = jax.random.normal
    jax.random.normal = lambda key, shape=(), dtype=None: normal(
        key, shape, jnp.float32).astype(dtype or jnp.float64)
  dt = _dtype()
  # Models are pytrees: cast their weights, keep their architecture.
  gen = G.replace(params=_cast(G.params, dt))
  lp = L.replace(params=_cast(L.params, dt))

  def run(idx, keys, space, steps, mse):
    shape = (len(idx), 32) if space == "w" else (len(idx), G.n_latent, 32)
    noise0, eps = draw_batch(keys, tuple(tuple(n.shape) for n in G.noise),
                             (1,) + shape[1:], steps)
    codes, image, _, hist, _ = embed_batch(
        gen, lp, jnp.asarray(targets[idx], dt), _cast(noise0, dt),
        _cast(eps, dt),
        jnp.broadcast_to(jnp.asarray(mean, dt), shape),
        jnp.asarray(learning_rates(steps), dt),
        jnp.asarray(noise_levels(steps) * std, dt), jnp.asarray(1e5, dt),
        jnp.asarray(mse, dt), space=space, resize="interpolate")
    return [np.asarray(x, np.float64) for x in (codes, image, hist[0])]

  out = {}
  for name, value in (("ab", run([0, 1], keys_w[:2], "w", 16, 0.0)),
                      ("plus", run([0, 1], keys_p, "w+", 12, 1.0))):
    for k, v in zip(("codes", "image", "losses"), value):
      out[f"{name}_{k}"] = v
  if not x64:
    for k, v in zip(("codes", "image", "losses"),
                    run([0, 2], keys_w[::2], "w", 16, 0.0)):
      out["ac_" + k] = v
    ones = [run([i], keys_p[i:i + 1], "w+", 12, 1.0) for i in range(2)]
    for j, k in enumerate(("codes", "image", "losses")):
      out["one_" + k] = np.concatenate([o[j] for o in ones])
  return out


def report_embedding(f32, f64):
  def err(a, b, kind):
    if kind == "codes":  # the tests' assert_allclose(rtol=r, atol=r) scale
      return np.max(np.abs(a - b) / (1.0 + np.abs(b)))
    if kind == "losses":
      return np.max(np.abs(a - b) / np.abs(b))
    return np.max(np.abs(a - b))

  print("embedding: codes max |Δ|/(1+|b|), losses max rel, image max |Δ|")
  rows = (("W, image 0 in batch (0,1) vs (0,2), f32", f32, "ab", 0, f32,
           "ac", 0),
          ("W, image 0, f32 vs f64", f32, "ab", 0, f64, "ab", 0),
          ("W+, batch vs one by one, f32", f32, "plus", None, f32, "one",
           None),
          ("W+, batch f32 vs f64", f32, "plus", None, f64, "plus", None),
          ("W+, one by one f32 vs f64", f32, "one", None, f64, "plus", None))
  for label, da, a, ia, db, b, ib in rows:
    vals = []
    for k in ("codes", "losses", "image"):
      x, y = da[f"{a}_{k}"], db[f"{b}_{k}"]
      if ia is not None:
        x, y = x[ia], y[ib]
      vals.append(err(x, y, k))
    print(f"  {label:42s} codes {vals[0]:.2e}  losses {vals[1]:.2e}  "
          f"image {vals[2]:.2e}")


def refine_tiny_values(tmp, x64):
  """tests/test_refine.py::test_batched_equals_looped_single_image_steps:
  the vmapped scan against one jitted step per Python call."""
  del tmp
  import test_refine
  from dhr_jax import refine
  G, codes, target, mask = test_refine.tiny_problem()
  codes, target, mask = (np.asarray(x) for x in (codes, target, mask))
  _precision(x64)
  dt = _dtype()
  k = test_refine.K
  spec = refine.refine_spec(G, k, "hybrid")
  hyper = _cast(refine.make_hyper(1e-2, 9e-2, 1.0, 0.0), dt)
  params, noise = _cast(G.params["synthesis"], dt), _cast(list(G.noise), dt)
  p, o, _, image, l_in, l_out = refine.compiled_refinement(
      spec, 6, 3, params, jnp.asarray(codes, dt), jnp.asarray(target, dt),
      jnp.asarray(mask, dt), noise, None, hyper)
  flat = lambda p: np.concatenate([np.ravel(np.asarray(x, np.float64))
                                   for x in jax.tree_util.tree_leaves(p)])
  out = {"batch_params": np.stack([flat(jax.tree_util.tree_map(
      lambda x: x[i], p)) for i in range(len(codes))]),
         "batch_offset": np.asarray(o, np.float64),
         "batch_image": np.asarray(image, np.float64),
         "batch_losses": np.concatenate([np.asarray(l_in, np.float64),
                                         np.asarray(l_out, np.float64)], 1)}
  if x64:
    return out
  res = refine.feature_resolution(k)
  rows = {"params": [], "offset": [], "image": [], "losses": []}
  render = jax.jit(lambda p, c, o, m: G.synthesis(
      {"synthesis": p}, c, feature_idx=k, offset=o, mask=m))
  for i in range(len(codes)):
    inputs = refine.RefineInputs(
        jnp.asarray(codes[i:i + 1]), jnp.asarray(target[i:i + 1]),
        jnp.asarray(mask[i:i + 1]),
        refine.area_pool(jnp.asarray(mask[i:i + 1]), res), list(G.noise))
    state = refine.init_state(spec, G.params["synthesis"], inputs.codes,
                              inputs.noise)
    losses = []
    for _ in range(6):
      state, (li, lo) = refine.hybrid_step(state, inputs, hyper, spec=spec)
      losses.append((float(li), float(lo)))
    losses = np.asarray(losses)
    rows["losses"].append(np.concatenate([losses[:3, 0], losses[:, 1]]))
    rows["params"].append(flat(state.params))
    rows["offset"].append(np.asarray(state.offset[0], np.float64))
    rows["image"].append(np.asarray(render(state.params, inputs.codes,
                                           state.offset,
                                           inputs.mask_feature)[0],
                                    np.float64))
  for key, v in rows.items():
    out["loop_" + key] = np.stack(v)
  return out


def report_refine_tiny(f32, f64):
  print("refine_tiny: worst relative L2 over images (image: max |Δ|)")
  for label, da, a, db, b in (("f32 vmapped scan vs f32 step by step", f32,
                               "batch", f32, "loop"),
                              ("f32 vmapped scan vs f64", f32, "batch", f64,
                               "batch"),
                              ("f32 step by step vs f64", f32, "loop", f64,
                               "batch")):
    vals = []
    for k in ("losses", "offset", "params", "image"):
      x, y = da[f"{a}_{k}"], db[f"{b}_{k}"]
      vals.append(np.max(np.abs(x - y)) if k == "image" else
                  max(rel_l2(u, v) for u, v in zip(x, y)))
    print(f"  {label:38s} losses {vals[0]:.2e}  offset {vals[1]:.2e}  "
          f"weights {vals[2]:.2e}  image {vals[3]:.2e}")


# ------------------------------------------------------------- primitives

def _torch_nhwc(fn, x, dtype):
  import torch
  t = torch.from_numpy(np.asarray(x, dtype)).permute(0, 3, 1, 2)
  return fn(t).permute(0, 2, 3, 1).detach().numpy().astype(np.float64)


def _primitive_cases():
  """name -> (ours in float32, reference in float32, float64 reference);
  each test's comparison re-run (tests/test_*.py name the case)."""
  import torch
  import torch.nn.functional as F
  from dhr_jax import alignment
  from dhr_jax.models import e4e, lpips, ops
  f32 = lambda a: np.asarray(a, np.float64)
  cases = {}
  for size, to in [(1024, 256), (64, 256), (256, 64), (48, 256)]:
    x = np.random.RandomState(size).randn(2, size, size, 3).astype(
        np.float32) * 1.5
    fn = lambda t: F.interpolate(torch.clamp(t, -1, 1), size=(to, to),
                                 mode="bilinear", align_corners=False)
    cases[f"ops.resize_generated {size}->{to}"] = (
        f32(ops.resize_generated(jnp.asarray(x), (to, to))),
        _torch_nhwc(fn, x, np.float32), _torch_nhwc(fn, x, np.float64))
  x = np.random.RandomState(0).randn(2, 5, 7, 3).astype(np.float32)
  fn = lambda t: F.interpolate(t, size=(9, 13), mode="bilinear",
                               align_corners=True)
  cases["e4e.upsample_bilinear_aligned"] = (
      f32(e4e.upsample_bilinear_aligned(jnp.asarray(x), (9, 13))),
      _torch_nhwc(fn, x, np.float32), _torch_nhwc(fn, x, np.float64))
  from PIL import Image
  pil_inputs = {}
  for size in (1024, 300, 128):
    x = np.random.RandomState(size).uniform(-1, 1, (1, size, size, 3)).astype(
        np.float32)
    pil_inputs[size] = x
    ref = np.stack([np.asarray(Image.fromarray(x[0, :, :, c], mode="F").resize(
        (256, 256), Image.BILINEAR)) for c in range(3)], -1)[None]
    cases[f"e4e.resize_for_encoder {size} vs PIL"] = (
        f32(e4e.resize_for_encoder(jnp.asarray(x))), f32(ref), None)
  for n_in, n_out in [(1024, 448), (100, 37), (14, 112)]:
    x = np.random.RandomState(0).randn(2, n_in, n_in + 3, 4).astype(
        np.float32)
    size = (n_out, n_out + 5)
    fn = lambda t: F.interpolate(t, size=size, mode="bilinear",
                                 align_corners=False)
    cases[f"ops.resize_bilinear_torch {n_in}->{n_out}"] = (
        f32(ops.resize_bilinear_torch(jnp.asarray(x), size)),
        _torch_nhwc(fn, x, np.float32), _torch_nhwc(fn, x, np.float64))
  for n_in, n_out in [(14, 3), (13, 5)]:
    x = np.random.RandomState(1).randn(1, n_in, n_in, 3).astype(np.float32)
    fn = lambda t: F.adaptive_avg_pool2d(t, n_out)
    cases[f"ops.adaptive_avg_pool {n_in}->{n_out}"] = (
        f32(ops.adaptive_avg_pool(jnp.asarray(x), n_out)),
        _torch_nhwc(fn, x, np.float32), _torch_nhwc(fn, x, np.float64))
  rs = np.random.RandomState(2)
  img = rs.randn(9, 13, 3).astype(np.float32)
  xy = np.stack([rs.uniform(-2.0, 14.0, (6, 7)),
                 rs.uniform(-2.0, 10.0, (6, 7))], -1).astype(np.float32)
  grid = (2.0 * xy + 1.0) / np.array([13, 9], np.float32) - 1.0
  fn = lambda t: F.grid_sample(t, torch.from_numpy(grid[None]).to(t.dtype),
                               mode="bilinear", padding_mode="zeros",
                               align_corners=False)
  cases["alignment.bilinear_sample"] = (
      f32(alignment.bilinear_sample(jnp.asarray(img), jnp.asarray(xy)))[None],
      _torch_nhwc(fn, img[None], np.float32),
      _torch_nhwc(fn, img[None], np.float64))
  # Convolution gradients: the custom JVP against XLA's own (test_ops.py);
  # the float64 reference is XLA's, evaluated in float64 below.
  kx, kw = jax.random.split(jax.random.PRNGKey(0))
  x = jax.random.normal(kx, (2, 7, 9, 5))
  w = jax.random.normal(kw, (6, 5, 3, 3))

  def loss(conv):
    def f(x, w):
      y = conv(x, w)
      ramp = jnp.arange(y.size, dtype=y.dtype).reshape(y.shape) / y.size
      return jnp.sum(jnp.sin(y) * ramp)
    return f
  # LPIPS's convolutions (ops.conv_hwio, HWIO kernels), strided as AlexNet's
  # first layer is.
  w_hwio = jax.random.normal(kw, (5, 5, 5, 6))
  hwio = ((1, 1), ((2, 2), (2, 2)))
  convs = {
      "ops.conv2d": (w, lambda x, w: ops.conv2d(x, w, 1),
                     lambda x, w: ops.conv2d_xla(x, w, 1)),
      "ops.conv_transpose2d_stride2": (
          w, ops.conv_transpose2d_stride2, ops.conv_transpose2d_stride2_xla),
      # The CPU input tangent's form on its own, through XLA's derivatives.
      "ops.conv_transpose2d_stride2_phases": (
          w, ops.conv_transpose2d_stride2_phases,
          ops.conv_transpose2d_stride2_xla),
      "ops.conv_hwio 5x5/2": (
          w_hwio, lambda x, w: ops.conv_hwio(x, w, (2, 2), hwio[1]),
          lambda x, w: ops.conv_hwio_xla(x, w, (2, 2), hwio[1]))}
  for name, (wc, conv, ref) in convs.items():
    got = jax.grad(loss(conv), (0, 1))(x, wc)
    want = jax.grad(loss(ref), (0, 1))(x, wc)
    cases[f"{name} value (max rel)"] = (f32(conv(x, wc)), f32(ref(x, wc)),
                                        None)
    cases[f"{name} grad x (max rel)"] = (f32(got[0]), f32(want[0]), None)
    cases[f"{name} grad w (max rel)"] = (f32(got[1]), f32(want[1]), None)
  # The blurs in a loop (where CPU runs `ops._depthwise`'s own form),
  # against XLA's form in the same loop (test_ops.py).
  xb = jax.random.normal(kx, (2, 7, 9, 5))
  fir = ops.fir_kernel(gain=4.0)
  blurs = {
      "ops.blur": (lambda x: ops.blur(x, fir, (2, 1)),
                   lambda x: ops.depthwise_xla(x, fir, ((2, 1), (2, 1)))),
      "ops.upsample_2x": (
          lambda x: ops.upsample_2x(x, fir, (2, 1)),
          lambda x: ops.depthwise_xla(x, fir, ((2, 2), (2, 2)), (2, 2)))}

  def in_loop(f):
    def run(x):
      def body(c, _):
        return c, (f(x * c), jax.grad(
            lambda x: loss(lambda x, _: f(x))(x, None))(x * c))
      return jax.tree_util.tree_map(lambda v: v[-1], jax.lax.scan(
          body, jnp.ones((), x.dtype), None, length=2)[1])
    return jax.jit(run)
  for name, (ours, ref) in blurs.items():
    got, want = in_loop(ours)(xb), in_loop(ref)(xb)
    cases[f"{name} in a loop, value (max rel)"] = (f32(got[0]), f32(want[0]),
                                                   None)
    cases[f"{name} in a loop, grad x (max rel)"] = (f32(got[1]),
                                                    f32(want[1]), None)
  alex = lpips.load("alex")
  k1, k2 = jax.random.split(jax.random.PRNGKey(1))
  a = jax.random.uniform(k1, (2, 64, 48, 3), minval=-1., maxval=1.)
  b = jnp.clip(a + 0.3 * jax.random.normal(k2, a.shape), -1., 1.)
  cases["lpips alex distance (rel)"] = (
      f32(jax.jit(alex.distance)(alex.params, a, b)), None, None)

  # float64 evaluations of the JAX-side references.
  _precision(True)
  for name, (wc, _, ref) in convs.items():
    want64 = jax.grad(loss(ref), (0, 1))(jnp.asarray(x, jnp.float64),
                                         jnp.asarray(wc, jnp.float64))
    key = f"{name} value (max rel)"
    cases[key] = cases[key][:2] + (f32(ref(jnp.asarray(x, jnp.float64),
                                           jnp.asarray(wc, jnp.float64))),)
    for i, part in enumerate(("x", "w")):
      key = f"{name} grad {part} (max rel)"
      cases[key] = cases[key][:2] + (f32(want64[i]),)
  for name, (_, ref) in blurs.items():
    want64 = in_loop(ref)(jnp.asarray(xb, jnp.float64))
    for i, part in enumerate(("value", "grad x")):
      key = f"{name} in a loop, {part} (max rel)"
      cases[key] = cases[key][:2] + (f32(want64[i]),)
  for size, x in pil_inputs.items():
    name = f"e4e.resize_for_encoder {size} vs PIL"
    cases[name] = cases[name][:2] + (f32(e4e.resize_for_encoder(
        jnp.asarray(x, jnp.float64))),)
  d64 = alex.distance(_cast(alex.params, jnp.float64),
                      jnp.asarray(a, jnp.float64), jnp.asarray(b, jnp.float64))
  cases["lpips alex distance (rel)"] = (cases["lpips alex distance (rel)"][0],
                                        None, f32(d64))
  _precision(False)
  return cases


def primitives_values(tmp, x64):
  del tmp, x64  # one process: float64 references are switched on inside
  out = {}
  for name, (ours, ref, ref64) in _primitive_cases().items():
    out[name + "|ours"] = ours
    if ref is not None:
      out[name + "|ref"] = ref
    if ref64 is not None:
      out[name + "|f64"] = ref64
  return out


def report_primitives(f32, f64):
  del f64
  print("primitives: max |Δ| (or max |Δ| / max |ref| where marked rel)")
  print(f"  {'case':44s} {'ours-ref':>10s} {'ours-f64':>10s} {'ref-f64':>10s}")
  names = list(dict.fromkeys(k.split("|")[0] for k in f32))
  for name in names:
    ours, ref, r64 = (f32.get(name + "|" + k) for k in ("ours", "ref", "f64"))
    scale = (np.max(np.abs(r64 if r64 is not None else ref))
             if "rel" in name else 1.0)
    d = lambda a, b: ("-" if a is None or b is None else
                      f"{np.max(np.abs(a - b)) / scale:.2e}")
    print(f"  {name:44s} {d(ours, ref):>10s} {d(ours, r64):>10s} "
          f"{d(ref, r64):>10s}")


# ---------------------------------------------------------------- driver

PARTS = {"stylegan2_64": (stylegan2_64_values, report_stylegan2_64),
         "refine": (refine_values, report_refine),
         "primitives": (primitives_values, report_primitives),
         "embedding": (embedding_values, report_embedding),
         "refine_tiny": (refine_tiny_values, report_refine_tiny),
         "refine_map": (refine_map_values, report_refine_map)}


def _evaluate(part, x64):
  """Runs `part` in a fresh process, so that nothing compiled in one
  precision is reused in the other."""
  with tempfile.TemporaryDirectory() as tmp:
    env = dict(os.environ, JAX_ENABLE_X64="0", JAX_PLATFORMS="cpu")
    env.pop("XLA_FLAGS", None)
    out = os.path.join(tmp, "values.npz")
    subprocess.run([sys.executable, __file__, "--worker", part, "--out", out]
                   + (["--x64"] if x64 else []), check=True, env=env)
    with np.load(out) as f:
      return dict(f)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--part", choices=sorted(PARTS) + ["all"], default="all")
  parser.add_argument("--worker", choices=sorted(PARTS), help=argparse.SUPPRESS)
  parser.add_argument("--out", help=argparse.SUPPRESS)
  parser.add_argument("--x64", action="store_true", help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.worker:
    with tempfile.TemporaryDirectory() as tmp:
      np.savez(args.out, **PARTS[args.worker][0](tmp, args.x64))
    return
  print(json.dumps({"jax": jax.__version__, "cpu": _cpu_name()}))
  for part in (sorted(PARTS) if args.part == "all" else [args.part]):
    f32 = _evaluate(part, False)
    f64 = _evaluate(part, True) if part != "primitives" else None
    PARTS[part][1](f32, f64)


def _cpu_name():
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("model name"):
          return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return "unknown"


if __name__ == "__main__":
  main()
