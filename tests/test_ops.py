"""The convolutions' hand-written weight derivatives (CPU) against XLA's own:
reverse mode, forward mode, vmapped per-image weights inside a loop."""
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dhr_jax.models import ops

CASES = {
    "conv3x3": (lambda x, w: ops.conv2d(x, w, 1),
                lambda x, w: ops._conv2d(x, w, 1), (6, 5, 3, 3)),
    "conv1x1": (lambda x, w: ops.conv2d(x, w, 0),
                lambda x, w: ops._conv2d(x, w, 0), (6, 5, 1, 1)),
    "conv3x3_valid": (lambda x, w: ops.conv2d(x, w, 0),
                      lambda x, w: ops._conv2d(x, w, 0), (6, 5, 3, 3)),
    "transposed": (ops.conv_transpose2d_stride2,
                   ops._conv_transpose2d_stride2, (6, 5, 3, 3)),
}


def _loss(conv):
  # A position-dependent, nonlinear loss so every tap's gradient differs.
  def f(x, w):
    y = conv(x, w)
    ramp = jnp.arange(y.size, dtype=y.dtype).reshape(y.shape) / y.size
    return jnp.sum(jnp.sin(y) * ramp)
  return f


def _max_rel(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


@pytest.mark.parametrize("name", sorted(CASES))
def test_gradients_match_xla(name):
  conv, ref, wshape = CASES[name]
  kx, kw = jax.random.split(jax.random.PRNGKey(0))
  x = jax.random.normal(kx, (2, 7, 9, 5))  # non-square: rows/cols not swapped
  w = jax.random.normal(kw, wshape)
  np.testing.assert_array_equal(conv(x, w), ref(x, w))
  got = jax.grad(_loss(conv), (0, 1))(x, w)
  want = jax.grad(_loss(ref), (0, 1))(x, w)
  # Two float32 programs, each compared with XLA's gradient in float64
  # (bench/float_precision.py --part primitives, conv3x3, max |Δ| / max):
  # ∂x 7.5e-7 (ours and XLA's equal here), ∂w 1.0e-6 and 9.4e-7 (4.9e-7
  # apart). Bounds ≥ 2× the sum of both errors: 3e-6 and 1e-5.
  assert _max_rel(got[0], want[0]) <= 3e-6
  assert _max_rel(got[1], want[1]) <= 1e-5
  # Forward mode too (a custom VJP would refuse it), each input alone and
  # both together.
  # Tangents are the same sums as the gradients above (same sizes), so the
  # same float32 error scale (~1e-6 each from float64) and bound.
  dx, dw = 0.3 * x[::-1], 0.1 * w[::-1]
  for tangents in ((dx, jnp.zeros_like(w)), (jnp.zeros_like(x), dw), (dx, dw)):
    t_got = jax.jvp(conv, (x, w), tangents)[1]
    t_want = jax.jvp(ref, (x, w), tangents)[1]
    assert _max_rel(t_got, t_want) <= 1e-5
  t_got = jax.jvp(lambda w: conv(x, w), (w,), (dw,))[1]
  assert _max_rel(t_got, jax.jvp(lambda w: ref(x, w), (w,), (dw,))[1]) <= 1e-5


@pytest.mark.parametrize("name", ["conv3x3", "transposed"])
def test_gradients_vmapped_in_a_scan(name):
  """Per-image weights (vmap) inside a compiled loop, as refinement runs."""
  conv, ref, wshape = CASES[name]
  kx, kw = jax.random.split(jax.random.PRNGKey(1))
  xs = jax.random.normal(kx, (3, 1, 6, 6, 5))
  ws = jax.random.normal(kw, (3,) + wshape)

  def descend(f):
    step = lambda w, x: (w - 0.1 * jax.grad(_loss(f), 1)(x, w), None)
    return jax.jit(jax.vmap(
        lambda w, x: jax.lax.scan(lambda w, _: step(w, x), w, None,
                                  length=3)[0]))

  # Three gradient steps of size 0.1 × (errors ~1e-6 relative, above) on
  # weights ~1: the weights' difference stays ~1e-7 relative.
  assert _max_rel(descend(conv)(ws, xs), descend(ref)(ws, xs)) <= 1e-5


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="CPU lowering")
@pytest.mark.parametrize("name", ["conv3x3", "transposed"])
def test_cpu_backward_convolutions_are_canonical(name):
  """XLA CPU runs a convolution as a library call only in the canonical
  form (NHWC input, HWIO kernel); inside a loop body nothing rewrites other
  forms, which then run as naive loops (10× slower at 64², 512 channels).
  The gradient of the convolutions in a scan must therefore stay HWIO."""
  conv, _, wshape = CASES[name]
  kx, kw = jax.random.split(jax.random.PRNGKey(2))
  x = jax.random.normal(kx, (1, 6, 6, 5))
  w = jax.random.normal(kw, wshape)

  def descend(w, x):
    def step(c, _):
      g = jax.grad(_loss(conv), (0, 1))(*c)
      return (c[0] - 0.1 * g[0], c[1] - 0.1 * g[1]), None
    return jax.lax.scan(step, (x, w), None, length=2)[0]

  hlo = jax.jit(descend).lower(w, x).compile().as_text()
  labels = re.findall(r"convolution\(.*?dim_labels=(\S+?),", hlo)
  assert labels, "no convolution left in the compiled gradient"
  assert all(lab == "b01f_01io->b01f" for lab in labels), labels


def _upfirdn_float64(x, kernel, pad, up):
  """upfirdn2d in numpy float64: zero insertion, padding, correlation with
  the flipped kernel."""
  x = np.asarray(x, np.float64)
  n, h, w, c = x.shape
  z = np.zeros((n, h * up, w * up, c))
  z[:, ::up, ::up] = x
  z = np.pad(z, ((0, 0), pad, pad, (0, 0)))
  k = np.asarray(kernel, np.float64)[::-1, ::-1]
  kh, kw = k.shape
  oh, ow = z.shape[1] - kh + 1, z.shape[2] - kw + 1
  return sum(k[i, j] * z[:, i:i + oh, j:j + ow]
             for i in range(kh) for j in range(kw))


FIR = {  # StyleGAN2's two uses: after the transposed conv, the skip upsampling
    "blur": (lambda x, k: ops.blur(x, k, (1, 1)),
             lambda x, k: ops._depthwise(x, k, [(1, 1), (1, 1)]), 1, (1, 1)),
    "upsample_2x": (lambda x, k: ops.upsample_2x(x, k, (2, 1)),
                    lambda x, k: ops._depthwise(x, k, [(2, 2), (2, 2)],
                                                (2, 2)), 2, (2, 1)),
}


@pytest.mark.parametrize("name", sorted(FIR))
def test_fir_shifted_adds_equal_depthwise_convolution(name):
  """The CPU shifted-add form of the blurs against XLA's depthwise
  convolution and a float64 reference, in value and in gradient."""
  fir, depthwise, up, pad = FIR[name]
  k = ops.fir_kernel(gain=4.0)
  assert ops._separable_taps(k) is not None
  x = jax.random.normal(jax.random.PRNGKey(3), (2, 7, 9, 5))
  want = _upfirdn_float64(x, k, pad, up)
  got, xla = fir(x, k), depthwise(x, k)
  assert got.shape == xla.shape == want.shape
  # Measured against float64 (max |Δ|, inputs ~N(0, 1), sums of 16 or 4
  # terms): value, shifted adds 3.4e-7 (blur) / 2.2e-7 (upsample), the
  # depthwise convolution 2.6e-7 / 1.3e-7; gradient (the adjoint FIR, with
  # the ramp below), shifted adds 2.9e-7 / 3.0e-7, depthwise 2.2e-7 /
  # 2.4e-7. Bound: 4 × the largest, 1.4e-6, for each against float64 and,
  # in gradient, for the two float32 forms against each other.
  tol = 1.4e-6
  assert np.max(np.abs(np.asarray(got) - want)) <= tol
  assert np.max(np.abs(np.asarray(xla) - want)) <= tol
  ramp = jnp.arange(got.size, dtype=got.dtype).reshape(got.shape) / got.size
  g_got = jax.grad(lambda x: jnp.sum(fir(x, k) * ramp))(x)
  g_xla = jax.grad(lambda x: jnp.sum(depthwise(x, k) * ramp))(x)
  assert np.max(np.abs(np.asarray(g_got) - np.asarray(g_xla))) <= tol
  assert np.max(np.abs(np.asarray(g_got))) > 0.1  # not a vanishing gradient


def test_fir_non_separable_kernel_uses_depthwise():
  k = np.arange(9, dtype=np.float32).reshape(3, 3)
  assert ops._separable_taps(k) is None
  x = jax.random.normal(jax.random.PRNGKey(4), (1, 6, 6, 2))
  np.testing.assert_array_equal(ops.blur(x, k, (1, 1)),
                                ops._depthwise(x, k, [(1, 1), (1, 1)]))
