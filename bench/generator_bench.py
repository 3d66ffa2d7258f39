"""Generator speed on this machine: compile time, seconds per forward and per
forward+backward (w.r.t. params, W+ and the feature offset, as refinement
needs), at official config-f channel counts with stand-in weights.

    python bench/generator_bench.py                 # 256 and 1024, batch 1
    python bench/generator_bench.py --sizes 256 --batch 2 --repeats 5
"""
import argparse
import platform
import time

import jax
import jax.numpy as jnp

from dhr_jax.models.stylegan2 import (feature_resolution, init_generator,
                                      official_channels)


def timed(fn, *args, repeats):
  t0 = time.perf_counter()
  jax.block_until_ready(fn(*args))           # compile + first run
  compile_s = time.perf_counter() - t0
  t0 = time.perf_counter()
  for _ in range(repeats):
    jax.block_until_ready(fn(*args))
  return compile_s, (time.perf_counter() - t0) / repeats


def bench(size, batch, repeats, feature_idx):
  G = init_generator(jax.random.PRNGKey(0), size=size, style_dim=512, n_mlp=8,
                     channels=official_channels(size, 2))
  key = jax.random.PRNGKey(1)
  wplus = jax.random.normal(key, (batch, G.n_latent, 512))
  res = feature_resolution(feature_idx)
  c = G.config["channels"][str(res)]
  offset = jax.random.normal(key, (batch, res, res, c))
  mask = (jax.random.uniform(key, (batch, res, res, 1)) > 0.5).astype(jnp.float32)

  fwd = jax.jit(lambda p, w, o: G.synthesis(p, w, feature_idx=feature_idx,
                                            offset=o, mask=mask))

  def loss(p, w, o):
    return jnp.mean(G.synthesis(p, w, feature_idx=feature_idx, offset=o,
                                mask=mask) ** 2)
  fwd_bwd = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))
  c_f, t_f = timed(fwd, G.params, wplus, offset, repeats=repeats)
  c_b, t_b = timed(fwd_bwd, G.params, wplus, offset, repeats=repeats)
  return c_f, t_f, c_b, t_b


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--sizes", type=int, nargs="+", default=[256, 1024])
  ap.add_argument("--batch", type=int, default=1)
  ap.add_argument("--repeats", type=int, default=3)
  args = ap.parse_args()
  print(f"# {platform.processor() or platform.machine()}, "
        f"{jax.device_count()} {jax.devices()[0].platform} device(s), jax {jax.__version__}")
  print("| size | batch | compile fwd (s) | fwd (s) | compile fwd+bwd (s) | fwd+bwd (s) |")
  print("|---|---|---|---|---|---|")
  for size in args.sizes:
    # DHR's layer 11 (128² feature); the last valid one for small sizes.
    k = min(11, 2 * (int(size).bit_length() - 1) - 4)
    c_f, t_f, c_b, t_b = bench(size, args.batch, args.repeats, k)
    print(f"| {size} | {args.batch} | {c_f:.1f} | {t_f:.3f} | {c_b:.1f} | {t_b:.3f} |",
          flush=True)


if __name__ == "__main__":
  main()
