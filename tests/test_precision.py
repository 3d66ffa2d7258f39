"""run.py's float32 is float32 on every backend (`dhr_jax.precision`): the
compiled programs carry the precision explicitly, so an accelerator cannot
round float32 products to TF32 or bfloat16 unless --precision says so."""
import re

import jax
import jax.numpy as jnp
import pytest

from dhr_jax import precision


@pytest.fixture
def restore_precision():
  before = jax.config.jax_default_matmul_precision
  jax.config.update("jax_default_matmul_precision", None)  # XLA's DEFAULT
  yield
  jax.config.update("jax_default_matmul_precision", before)


def _precisions(text):
  """The first operand's precision of every dot and convolution."""
  return re.findall(r"precision(?:_config)? = \[(?:#stablehlo<precision )?"
                    r"(\w+)", text)


def test_the_default_is_explicit_float32(restore_precision):
  x = jnp.ones((1, 4, 4, 3))
  k = jnp.ones((3, 3, 3, 2))
  conv = lambda x, k: jax.lax.conv_general_dilated(
      x, k, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
  f = lambda x, k: (jnp.einsum("bhwc,c->bhw", x, k[0, 0, :, 0]), conv(x, k))
  # Unset, XLA's DEFAULT leaves the choice to the backend.
  lowered = lambda: _precisions(jax.jit(f).lower(x, k).as_text())
  assert lowered() == ["DEFAULT", "DEFAULT"]
  assert precision.set_default() == "float32"
  assert lowered() == ["HIGHEST", "HIGHEST"]  # the product and the conv
  precision.set_default("tensorfloat32")
  assert lowered() == ["HIGH", "HIGH"]


def test_unknown_precision_is_refused(restore_precision):
  with pytest.raises(ValueError, match="float32, tensorfloat32, bfloat16"):
    precision.set_default("float16")
