"""The convolutions' hand-written CPU forms against XLA's own: weight
derivatives (reverse mode, forward mode, vmapped per-image weights inside a
loop), the transposed convolution's input tangent as four phases, the blurs'
kernel layout inside loops; and that compiled loops keep the fast forms."""
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dhr_jax.models import ops

CASES = {
    "conv3x3": (lambda x, w: ops.conv2d(x, w, 1),
                lambda x, w: ops.conv2d_xla(x, w, 1), (6, 5, 3, 3)),
    "conv1x1": (lambda x, w: ops.conv2d(x, w, 0),
                lambda x, w: ops.conv2d_xla(x, w, 0), (6, 5, 1, 1)),
    "conv3x3_valid": (lambda x, w: ops.conv2d(x, w, 0),
                      lambda x, w: ops.conv2d_xla(x, w, 0), (6, 5, 3, 3)),
    "transposed": (ops.conv_transpose2d_stride2,
                   ops.conv_transpose2d_stride2_xla, (6, 5, 3, 3)),
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


def test_transposed_phases_match_xla():
  """The four-phase form of the stride-2 transposed convolution (the CPU
  input tangent of `conv_transpose2d_stride2`) against XLA's dilated form,
  in value and in XLA's gradients of each (x and weight), in both kernel
  layouts the tangent may use."""
  kx, kw = jax.random.split(jax.random.PRNGKey(3))
  x = jax.random.normal(kx, (2, 7, 9, 5))
  w = jax.random.normal(kw, (6, 5, 3, 3))
  ref = ops.conv_transpose2d_stride2_xla
  for layout in ("HWIO", "HWOI"):
    got = ops.conv_transpose2d_stride2_phases(x, w, kernel_layout=layout)
    # bench/float_precision.py --part primitives, each float32 program
    # against XLA's form in float64 (max |Δ| / max): phases 9.6e-8, XLA
    # 7.5e-8. Bound ≥ 2× their sum: 4e-7.
    assert _max_rel(got, ref(x, w)) <= 4e-7
  conv = ops.conv_transpose2d_stride2_phases
  got = jax.grad(_loss(conv), (0, 1))(x, w)
  want = jax.grad(_loss(ref), (0, 1))(x, w)
  # Same measurement: ∂x 2.5e-7 (phases) and 2.5e-7 (XLA), ∂w 3.6e-7 and
  # 4.1e-7 from float64. Bounds ≥ 2× the sums: 1e-6 and 2e-6.
  assert _max_rel(got[0], want[0]) <= 1e-6
  assert _max_rel(got[1], want[1]) <= 2e-6


FIR = ops.fir_kernel(gain=4.0)
BLURS = {
    "blur": (lambda x: ops.blur(x, FIR, (2, 1)),
             lambda x: ops.depthwise_xla(x, FIR, ((2, 1), (2, 1)))),
    "upsample_2x": (lambda x: ops.upsample_2x(x, FIR, (2, 1)),
                    lambda x: ops.depthwise_xla(x, FIR, ((2, 2), (2, 2)),
                                                (2, 2))),
}


@pytest.mark.parametrize("name", sorted(BLURS))
def test_blurs_in_a_loop_match_xla(name):
  """Inside a loop, where CPU runs the blurs in their own kernel layout,
  value and input gradient against XLA's form in the same loop."""
  ours, ref = BLURS[name]
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 7, 9, 5))

  def in_loop(f):
    loss = lambda x: _loss(lambda x, _: f(x))(x, None)
    def body(c, _):
      return c, (f(x * c), jax.grad(loss)(x * c))
    run = lambda x: jax.lax.scan(body, jnp.ones((), x.dtype), None, length=2)
    return jax.jit(run), jax.jit(lambda x: jax.tree_util.tree_map(
        lambda v: v[-1], run(x)[1]))

  (program, got), (_, want) = in_loop(ours), in_loop(ref)
  got, want = got(x), want(x)
  # bench/float_precision.py --part primitives ("in a loop"), each float32
  # program against XLA's form in float64 (max |Δ| / max): values 1.3e-7
  # (ours) and 5.7e-8 (XLA's) for the blur, 1.0e-7 and 6.8e-8 for the
  # up-sampling; input gradients 1.3e-7 each. Bounds ≥ 2× the sums: 4e-7
  # and 6e-7.
  assert _max_rel(got[0], want[0]) <= 4e-7
  assert _max_rel(got[1], want[1]) <= 6e-7
  if jax.default_backend() == "cpu":
    # The canonical depthwise form goes to XLA CPU's convolution library,
    # which runs these blurs ~40× slower than XLA's own loop (ops.py).
    hlo = program.lower(x).compile().as_text()
    grouped = re.findall(r"convolution\(.*?dim_labels=(\S+?),.*"
                         r"feature_group_count", hlo)
    assert grouped and "b01f_01io->b01f" not in grouped, grouped


# LPIPS's convolutions (flax layouts: HWIO kernels, strides, string padding).
HWIO_CASES = {
    "3x3": ((3, 3, 5, 6), (1, 1), ((1, 1), (1, 1))),
    "5x5_stride2": ((5, 5, 5, 6), (2, 2), ((2, 2), (2, 2))),  # AlexNet-like
    "1x1_same": ((1, 1, 5, 1), (1, 1), "SAME"),  # the lin layers
}


@pytest.mark.parametrize("name", sorted(HWIO_CASES))
def test_conv_hwio_matches_xla(name):
  wshape, strides, padding = HWIO_CASES[name]
  conv = lambda x, w: ops.conv_hwio(x, w, strides, padding)
  ref = lambda x, w: jax.lax.conv_general_dilated(
      x, w, strides, padding, dimension_numbers=("NHWC", "HWIO", "NHWC"))
  kx, kw = jax.random.split(jax.random.PRNGKey(0))
  x = jax.random.normal(kx, (2, 7, 9, 5))
  w = jax.random.normal(kw, wshape)
  np.testing.assert_array_equal(conv(x, w), ref(x, w))
  got = jax.grad(_loss(conv), (0, 1))(x, w)
  want = jax.grad(_loss(ref), (0, 1))(x, w)
  # bench/float_precision.py --part primitives, the 5x5/2 case, each of the
  # two float32 programs against float64: ∂x 1.7e-6, ∂w 2.4e-6 (max |Δ| /
  # max). Bound: 2× the sum of both programs' errors, 1e-5.
  assert _max_rel(got[0], want[0]) <= 1e-5
  assert _max_rel(got[1], want[1]) <= 1e-5
  dx, dw = 0.3 * x[::-1], 0.1 * w[::-1]
  for tangents in ((dx, jnp.zeros_like(w)), (jnp.zeros_like(x), dw), (dx, dw)):
    assert _max_rel(jax.jvp(conv, (x, w), tangents)[1],
                    jax.jvp(ref, (x, w), tangents)[1]) <= 1e-5


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="CPU lowering")
@pytest.mark.parametrize("name", sorted(HWIO_CASES))
def test_lpips_input_gradient_in_a_scan_is_canonical(name):
  """The input gradient of LPIPS's convolutions in a compiled loop (the
  coarse inversion, refinement) stays in the canonical form."""
  wshape, strides, padding = HWIO_CASES[name]
  kx, kw = jax.random.split(jax.random.PRNGKey(2))
  x = jax.random.normal(kx, (1, 9, 9, 5))
  w = jax.random.normal(kw, wshape)
  conv = lambda x: ops.conv_hwio(x, w, strides, padding)
  step = lambda x, _: (x - 0.1 * jax.grad(_loss(lambda x, w: conv(x)))(x, w),
                       None)
  hlo = jax.jit(lambda x: jax.lax.scan(step, x, None, length=2)[0]).lower(
      x).compile().as_text()
  labels = re.findall(r"convolution\(.*?dim_labels=(\S+?),", hlo)
  # A 1×1 convolution with one output becomes a dot product, no convolution.
  assert labels or name == "1x1_same"
  assert all(lab == "b01f_01io->b01f" for lab in labels), labels


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
  # Nor strided: the transposed convolution's input gradient is its four
  # output phases (stride 1), not one stride-2 convolution (2.4× slower in
  # a scan, 64², 512 → 256 channels).
  windows = re.findall(r"convolution\(.*?window=\{([^}]*)\}", hlo)
  assert len(windows) == len(labels)
  assert not any("stride" in w for w in windows), windows
