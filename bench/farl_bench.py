"""Times one FaRL parse (align → 448² network → warp back → softmax).

    python bench/farl_bench.py                  # stand-in weights, 1024² input
    python bench/farl_bench.py --ckpt ckpt/farl --size 1024 --repeats 3

Weights do not change the cost, so without --ckpt the parser gets random
stand-in values of the real shapes (no file needed). Prints the compile time
and the seconds per parse after compilation on this machine.
"""
import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from dhr_jax import alignment  # noqa: E402
from dhr_jax.models import farl  # noqa: E402


def stand_in_parser():
  """The celebm/448 parser with random weights of the real shapes."""
  config = dict(farl.DEFAULT_CONFIG)
  net = farl.network_from_config(config)
  shapes = jax.eval_shape(net.init, jax.random.PRNGKey(0),
                          jnp.zeros((1, 448, 448, 3)))
  rs = np.random.RandomState(0)

  def fill(path, a):
    name = jax.tree_util.keystr(path)
    if "var" in name or "image_std" in name:
      return np.ones(a.shape, np.float32)
    scale = 1.0 / np.sqrt(np.prod(a.shape[:-1])) if a.ndim > 1 else 0.1
    return (rs.standard_normal(a.shape) * scale).astype(np.float32)

  params = jax.tree_util.tree_map_with_path(fill, shapes)
  return farl.Parser(params=params, config=config)


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--ckpt", help="converted parser directory (optional)")
  ap.add_argument("--size", type=int, default=1024, help="input side")
  ap.add_argument("--batch", type=int, default=1)
  ap.add_argument("--repeats", type=int, default=3)
  ap.add_argument("--breakdown", action="store_true",
                  help="also time the 448² network alone")
  args = ap.parse_args(argv)

  p = farl.load(args.ckpt) if args.ckpt else stand_in_parser()
  images = jax.random.uniform(jax.random.PRNGKey(0),
                              (args.batch, args.size, args.size, 3),
                              minval=-1.0, maxval=1.0)
  landmarks = jnp.broadcast_to(
      jnp.asarray(alignment.ffhq_landmarks(args.size)), (args.batch, 5, 2))
  t0 = time.perf_counter()
  # The parser is a pytree: one program per config and shapes.
  jax.jit(lambda P, x, lm: P.parse(P.params, x, lm)).lower(
      p, images, landmarks).compile()
  compile_s = time.perf_counter() - t0
  jax.block_until_ready(p.parse(p.params, images, landmarks))  # warm-up
  times = []
  for _ in range(args.repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(p.parse(p.params, images))
    times.append(time.perf_counter() - t0)
  print(f"device: {jax.devices()[0].device_kind} ({jax.default_backend()}), "
        f"{os.cpu_count()} CPUs visible")
  print(f"FaRL parse, batch {args.batch} at {args.size}²: compile "
        f"{compile_s:.1f} s; {np.median(times):.2f} s per parse after "
        f"compilation (median of {', '.join(f'{t:.2f}' for t in times)})")
  if args.breakdown:
    x = jnp.zeros((args.batch, 448, 448, 3))
    jax.block_until_ready(p.logits(p.params, x))
    times = []
    for _ in range(args.repeats):
      t0 = time.perf_counter()
      jax.block_until_ready(p.logits(p.params, x))
      times.append(time.perf_counter() - t0)
    print(f"  of which the 448² network alone: {np.median(times):.2f} s")

if __name__ == "__main__":
  main()
