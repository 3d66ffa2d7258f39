"""Long compiled step loops run as a few calls of one program, so that
progress is told from the host, between calls.

JAX does not write a program that calls back to the host to its persistent
compilation cache (`dhr_jax.compile_cache`), so a loop that reported its
steps from inside (`jax.debug.callback`) was compiled again by every
process. Instead the coarse inversion, the optimisation embedding and the
refinement compile a program that runs steps [lo, hi) of their loop, lo and
hi traced (one program however the loop is split), with the loop's state
and its per-step history as inputs and outputs; `run_steps` calls it and
tells `progress` the step reached after each call. Nothing in the program
depends on the split, so results are the same bits with or without
progress, in one call or in many (tests/test_embedding.py,
tests/test_refine.py).

How many steps a call runs: without progress, all of them (one call). With
progress, the first call runs one step (it may include compiling) and every
later one as many as fit in `CALL_SECONDS` at the speed of the call before,
at least one. A display that redraws every half second (`loop.Progress`)
then moves steadily whether a step takes 10 ms (a small stand-in) or 10 s
(1024²), and each wait between calls (dispatching the next, ~1 ms) stays
around 0.1 % of the time. A fixed number of steps per call could not do
both: a few steps of 1024² refinement are minutes without a word, and one
step per call of a small model is mostly waiting.
"""
import time

import jax
import numpy as np

CALL_SECONDS = 1.0


def run_steps(advance, carry, lo, hi, progress=None):
  """Steps lo, ..., hi − 1 of a loop: `advance(carry, a, b)` runs steps
  [a, b) (a compiled program, a and b int32 scalars) and returns the new
  carry. progress: optional `progress(k)`, told k = the steps finished (in
  lo + 1 .. hi, increasing, hi last) when they are; None runs one call."""
  if progress is None or hi <= lo:
    return advance(carry, np.int32(lo), np.int32(hi)) if hi > lo else carry
  k, n = lo, 1
  while k < hi:
    m = min(n, hi - k)
    t = time.perf_counter()
    carry = jax.block_until_ready(advance(carry, np.int32(k), np.int32(k + m)))
    per_step = (time.perf_counter() - t) / m
    k += m
    progress(k)
    n = max(1, int(CALL_SECONDS / max(per_step, 1e-6)))
  return carry
