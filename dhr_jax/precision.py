"""Float32 means float32 on every backend, unless a lower precision is named.

XLA's DEFAULT precision lets an accelerator compute float32 matrix products
and convolutions with fewer mantissa bits: TF32 (10 bits) on NVIDIA GPUs from
Ampere on, bfloat16 passes on TPUs. That is ~1e-3 relative per product, an
order of magnitude past the parity bounds the tests hold the CPU to. run.py,
the browser editor and bench/ therefore set JAX's default matmul precision
before compiling anything: 'float32' unless `--precision` names a reduced
mode ('tensorfloat32', 'bfloat16'), a speed switch for accelerators.

Library code never sets it: a research program that imports dhr_jax keeps
its own JAX settings (`jax.default_matmul_precision("float32")` as a context
manager does the same for one block).
"""
import jax

CHOICES = ("float32", "tensorfloat32", "bfloat16")
DEFAULT = "float32"


def set_default(name=DEFAULT):
  """JAX's default precision of float32 dots and convolutions, process-wide
  (call before anything is compiled). Raises ValueError for other names."""
  if name not in CHOICES:
    raise ValueError(f"precision {name!r}: expected one of "
                     f"{', '.join(CHOICES)}")
  jax.config.update("jax_default_matmul_precision", name)
  return name
