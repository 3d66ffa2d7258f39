"""StyleGAN2 building blocks and the models' resampling, as pure functions
on NHWC arrays.

Weights keep the PyTorch layouts of the official checkpoints ((out, in) for
linear layers, (out, in, kh, kw) for convolutions), so conversion is a plain
renaming and the equalised-learning-rate scales are applied here, at run time,
exactly as the official code does.
"""
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax.custom_derivatives import SymbolicZero

SQRT2 = math.sqrt(2.0)
_NHWC = ("NHWC", "HWIO", "NHWC")


def fir_kernel(taps=(1, 3, 3, 1), gain=1.0):
  """Separable FIR kernel k⊗k normalised to sum `gain`, as numpy (a constant)."""
  k = np.asarray(taps, np.float32)
  k = np.outer(k, k)
  return k / k.sum() * gain


def fused_leaky_relu(x, bias, negative_slope=0.2):
  """leaky_relu(x + bias) · √2: the gain keeps activations' variance at 1."""
  x = x + bias
  return jnp.where(x >= 0, x, x * negative_slope) * SQRT2


def pixel_norm(z):
  return z * jax.lax.rsqrt(jnp.mean(z * z, axis=-1, keepdims=True) + 1e-8)


def depthwise_xla(x, kernel, padding, lhs_dilation=(1, 1),
                  kernel_layout="HWIO"):
  """Per-channel correlation with a fixed 2-D FIR kernel (XLA's form and
  derivative: the reference `_depthwise` is checked against).

  The official upfirdn2d flips the kernel before correlating; our kernels are
  symmetric, but we flip anyway so any kernel behaves the same.
  """
  c = x.shape[-1]
  k = jnp.asarray(np.asarray(kernel)[::-1, ::-1], x.dtype)
  per_group = (1, c) if kernel_layout == "HWIO" else (c, 1)
  k = jnp.tile(k[:, :, None, None], (1, 1) + per_group)
  return jax.lax.conv_general_dilated(
      x, k, window_strides=(1, 1), padding=padding, lhs_dilation=lhs_dilation,
      dimension_numbers=("NHWC", kernel_layout, "NHWC"),
      feature_group_count=c)


# XLA CPU hands a depthwise convolution in the canonical (HWIO) form to its
# convolution library, which runs the blurs ~40× slower than XLA's own loop
# does the same convolution in an (kh, kw, out, in) kernel layout (a 4×4
# blur of 129²×256 inside a scan: 0.12 s against 3 ms). XLA brings the
# latter into the canonical form outside loops, so there the two are one
# program; so on CPU the forward blur is always written with the OI layout,
# which inside a loop (refinement's, the coarse inversion's) stays XLA's own
# loop. Its tangent keeps the HWIO form, whose transpose (the backward
# pass) is already the OI one.
@functools.partial(jax.custom_jvp, nondiff_argnums=(1, 2, 3))
def _depthwise(x, kernel, padding, lhs_dilation):
  """depthwise_xla; kernel, padding and lhs_dilation as (nested) tuples."""
  conv = lambda x, **kw: depthwise_xla(x, kernel, padding, lhs_dilation, **kw)
  return jax.lax.platform_dependent(
      x, cpu=functools.partial(conv, kernel_layout="HWOI"), default=conv)


def _depthwise_jvp(kernel, padding, lhs_dilation, primals, tangents):
  (x,), (dx,) = primals, tangents
  return (_depthwise(x, kernel, padding, lhs_dilation),
          depthwise_xla(dx, kernel, padding, lhs_dilation))


_depthwise.defjvp(_depthwise_jvp)


def _hashable(kernel):
  return tuple(tuple(float(v) for v in row) for row in np.asarray(kernel))


def blur(x, kernel, pad):
  """upfirdn2d(x, kernel, up=1, down=1, pad=(pad0, pad1))."""
  p0, p1 = pad
  return _depthwise(x, _hashable(kernel), ((p0, p1), (p0, p1)), (1, 1))


def upsample_2x(x, kernel, pad):
  """upfirdn2d(x, kernel, up=2, pad=(pad0, pad1)).

  Zero-insertion upsampling leaves a trailing zero after the last sample;
  lhs_dilation does not, so it is added to the far padding.
  """
  p0, p1 = pad
  return _depthwise(x, _hashable(kernel), ((p0, p1 + 1), (p0, p1 + 1)),
                    (2, 2))


def conv2d_xla(x, weight, padding, kernel_layout="HWIO"):
  """`conv2d` with XLA's own derivative: public as the reference the custom
  derivatives below are checked and benchmarked against."""
  w = jnp.transpose(weight, ["OIHW".index(c) for c in kernel_layout])
  return jax.lax.conv_general_dilated(
      x, w, (1, 1), [(padding, padding)] * 2,
      dimension_numbers=("NHWC", kernel_layout, "NHWC"))


def conv_transpose2d_stride2_xla(x, weight, kernel_layout="HWIO"):
  """`conv_transpose2d_stride2` with XLA's own derivative (the reference,
  as `conv2d_xla`)."""
  k = weight.shape[-1]
  w = jnp.transpose(weight[:, :, ::-1, ::-1],
                    ["OIHW".index(c) for c in kernel_layout])
  return jax.lax.conv_general_dilated(
      x, w, (1, 1), [(k - 1, k - 1)] * 2, lhs_dilation=(2, 2),
      dimension_numbers=("NHWC", kernel_layout, "NHWC"))


# XLA's CPU backward-filter convolution is slow: ~45× the forward for the
# stride-2 transposed conv, and slower again inside a while loop, which is
# where refinement runs (jax-ml/jax#12868). So on CPU the convolutions'
# derivative in the weight is written as k² matrix products, one per tap,
# whose transpose (the weight gradient) is k² GEMMs. A custom JVP rather
# than a custom VJP keeps forward-mode (jax.jvp, jacfwd) working. Other
# backends keep XLA's own derivative; forward values are XLA's everywhere.
#
# The input derivative is XLA's convolution, but on CPU its tangent is
# written with an (kh, kw, out, in) kernel: reverse mode transposes that
# into a convolution with an HWIO kernel. XLA CPU calls its convolution
# library only for the canonical NHWC/HWIO form and brings other forms
# into it only outside loops; inside refinement's loop the transpose of
# the plain HWIO tangent (an OI kernel) ran as a naive loop, 10× the
# forward's time and ~70% of a 128² weight step. The stride-2 transposed
# convolution's input tangent is, on CPU, its four output phases
# (`conv_transpose2d_stride2_phases`), whose transpose is four stride-1
# convolutions where the dilated form's is a stride-2 one (2.4× slower at
# 64²×512→256 inside a scan).


def _conv2d_taps(x, weight, padding):
  """conv2d_xla as Σ over taps of shifted x @ weight[:, :, ty, tx]ᵀ."""
  k = weight.shape[-1]
  p = ((0, 0), (padding, padding), (padding, padding), (0, 0))
  x = jnp.pad(x, p)
  h, w = x.shape[1] - k + 1, x.shape[2] - k + 1
  out = 0.0
  for ty in range(k):
    for tx in range(k):
      out = out + jnp.einsum("nhwi,oi->nhwo", x[:, ty:ty + h, tx:tx + w],
                             weight[:, :, ty, tx])
  return out


def _conv_transpose2d_taps(x, weight):
  """conv_transpose2d_stride2_xla as Σ over taps of x @ weight[:, :, ty, tx]ᵀ
  spread onto every other pixel from (ty, tx) (interior padding)."""
  k = weight.shape[-1]
  zero = jnp.zeros((), x.dtype)
  out = 0.0
  for ty in range(k):
    for tx in range(k):
      v = jnp.einsum("nhwi,oi->nhwo", x, weight[:, :, ty, tx])
      out = out + jax.lax.pad(v, zero, ((0, 0, 0), (ty, k - 1 - ty, 1),
                                        (tx, k - 1 - tx, 1), (0, 0, 0)))
  return out


def conv_transpose2d_stride2_phases(x, weight, kernel_layout="HWIO"):
  """conv_transpose2d_stride2_xla (3×3 kernels) as its four output phases.

  Output pixel (2m + a, 2n + b) reads only the taps ty ≡ a, tx ≡ b (mod 2)
  of the kernel: even phases the taps (2, 0) of input rows m − 1 and m, odd
  ones tap 1 of row m. Each phase is therefore a canonical convolution of
  the undilated input with a 2×2, 2×1, 1×2 or 1×1 kernel; the phases are
  interleaved into the (2H + 1) × (2W + 1) output. It multiplies exactly
  the products of XLA's form, without the zeros of the dilated input, and
  its transpose (the input gradient) is again four canonical stride-1
  convolutions, where XLA's form transposes into a stride-2 one that XLA
  CPU runs at ~40% of a forward convolution's rate inside a loop.
  kernel_layout as conv2d_xla's.
  """
  n, h, w, _ = x.shape
  if weight.shape[-2:] != (3, 3):
    raise NotImplementedError("conv_transpose2d_stride2_phases: 3×3 only")

  def phase(rows, cols):
    k = weight[:, :, rows][:, :, :, cols]
    k = jnp.transpose(k, ["OIHW".index(c) for c in kernel_layout])
    pad = [(len(rows) - 1,) * 2, (len(cols) - 1,) * 2]
    return jax.lax.conv_general_dilated(
        x, k, (1, 1), pad, dimension_numbers=("NHWC", kernel_layout, "NHWC"))

  even, odd = [2, 0], [1]
  zero = jnp.zeros((), x.dtype)
  # Odd phases have one row (column) fewer: pad them to the even ones' size,
  # interleave, then drop the padding's row and column at the far end.
  grow = lambda v, a, b: jax.lax.pad(
      v, zero, ((0, 0, 0), (0, a, 0), (0, b, 0), (0, 0, 0)))
  rows_even = jnp.stack([phase(even, even), grow(phase(even, odd), 0, 1)], 3)
  rows_odd = jnp.stack([grow(phase(odd, even), 1, 0),
                        grow(phase(odd, odd), 1, 1)], 3)
  y = jnp.stack([rows_even, rows_odd], 2).reshape(n, 2 * h + 2, 2 * w + 2, -1)
  return y[:, :2 * h + 1, :2 * w + 1]


def _tangent(conv, taps, x, weight, dx, dweight, input_tangent=None):
  """conv's tangent. Zero (symbolic) tangents cost nothing: the weights are
  constants when inverting (gradients for the codes only) and in
  refinement's offset-only steps. input_tangent: the CPU form of the input
  tangent (conv(·, kernel_layout=...)) where it is not conv itself."""
  parts = []
  if not isinstance(dx, SymbolicZero):
    parts.append(jax.lax.platform_dependent(
        dx, weight,
        cpu=functools.partial(input_tangent or conv, kernel_layout="HWOI"),
        default=conv))
  if not isinstance(dweight, SymbolicZero):
    parts.append(jax.lax.platform_dependent(x, dweight, cpu=taps,
                                            default=conv))
  return sum(parts[1:], parts[0])


@functools.partial(jax.custom_jvp, nondiff_argnums=(2,))
def conv2d(x, weight, padding):
  """x NHWC, weight (out, in, kh, kw) as in PyTorch; cross-correlation."""
  return conv2d_xla(x, weight, padding)


def _conv2d_jvp(padding, primals, tangents):
  (x, weight), (dx, dweight) = primals, tangents
  conv = lambda x, w, **kw: conv2d_xla(x, w, padding, **kw)
  taps = lambda x, w: _conv2d_taps(x, w, padding)
  return conv(x, weight), _tangent(conv, taps, x, weight, dx, dweight)


conv2d.defjvp(_conv2d_jvp, symbolic_zeros=True)


@jax.custom_jvp
def conv_transpose2d_stride2(x, weight):
  """PyTorch conv_transpose2d(x, weight.transpose(0, 1), stride=2, padding=0).

  weight is (out, in, k, k). A strided transposed convolution is a plain
  convolution of the zero-dilated input with the spatially flipped kernel.
  """
  return conv_transpose2d_stride2_xla(x, weight)


def _conv_transpose_jvp(primals, tangents):
  (x, weight), (dx, dweight) = primals, tangents
  conv = conv_transpose2d_stride2_xla
  phases = (conv_transpose2d_stride2_phases if weight.shape[-1] == 3
            else None)
  return conv(x, weight), _tangent(conv, _conv_transpose2d_taps, x, weight,
                                   dx, dweight, input_tangent=phases)


conv_transpose2d_stride2.defjvp(_conv_transpose_jvp, symbolic_zeros=True)


def conv_hwio_xla(x, kernel, strides, padding, kernel_layout="HWIO"):
  """`conv_hwio` with XLA's own derivative (the reference, as
  `conv2d_xla`)."""
  if kernel_layout == "HWOI":
    kernel = jnp.swapaxes(kernel, 2, 3)
  return jax.lax.conv_general_dilated(
      x, kernel, strides, padding,
      dimension_numbers=("NHWC", kernel_layout, "NHWC"))


@functools.partial(jax.custom_jvp, nondiff_argnums=(2, 3))
def conv_hwio(x, kernel, strides, padding):
  """A convolution with flax's layouts (NHWC x, HWIO kernel), for networks
  whose input is differentiated (LPIPS in every loss): on CPU the input's
  tangent uses an HWOI kernel, as in `_tangent`, so the backward pass is the
  canonical form even inside a loop (a VGG16 input gradient at 256² inside
  a scan: 4.0 s → 0.86 s on 2 cores). strides: a tuple; padding: a
  tuple of (low, high) pairs or a string, as lax takes it."""
  return conv_hwio_xla(x, kernel, strides, padding)


def _conv_hwio_jvp(strides, padding, primals, tangents):
  (x, kernel), (dx, dkernel) = primals, tangents
  conv = lambda x, k, **kw: conv_hwio_xla(x, k, strides, padding, **kw)
  # The kernel's tangent is XLA's convolution on every backend (LPIPS's
  # weights are never trained), hence `conv` in the place of the taps.
  return conv(x, kernel), _tangent(conv, conv, x, kernel, dx, dkernel)


conv_hwio.defjvp(_conv_hwio_jvp, symbolic_zeros=True)


def flax_conv(lhs, rhs, window_strides, padding, *, lhs_dilation=None,
              rhs_dilation=None, dimension_numbers=None,
              feature_group_count=1, precision=None):
  """`conv_hwio` in the place of `lax.conv_general_dilated` for
  `nn.Conv(conv_general_dilated=...)`: plain (undilated, ungrouped) 2-D
  convolutions only."""
  plain = lambda d: d is None or all(v == 1 for v in d)
  want = jax.lax.conv_dimension_numbers(lhs.shape, rhs.shape, _NHWC)
  if not (plain(lhs_dilation) and plain(rhs_dilation)
          and feature_group_count == 1 and precision is None
          and dimension_numbers in (None, want)):
    raise NotImplementedError("flax_conv: only plain NHWC/HWIO convolutions")
  if not isinstance(padding, str):
    padding = tuple(tuple(p) for p in padding)
  return conv_hwio(lhs, rhs, tuple(window_strides), padding)


def modulated_conv(x, style, weight, *, demodulate, upsample, blur_kernel):
  """StyleGAN2 modulated convolution, per-sample styles, shared weights.

  Modulating the input and demodulating the output equals convolving with
  per-sample modulated weights (the official "non-fused" path): it keeps
  one weight tensor for the whole batch, which XLA convolves much faster
  than a grouped convolution with a weight per sample.

  x: (B, H, W, in); style: (B, in); weight: (1, out, in, k, k) unscaled.
  """
  _, out_c, in_c, k, _ = weight.shape
  w = weight[0] * (1.0 / math.sqrt(in_c * k * k))
  x = x * style[:, None, None, :].astype(x.dtype)
  if upsample:
    # Official padding for a 3x3 transposed conv followed by the 4-tap blur.
    p = (blur_kernel.shape[0] - 2) - (k - 1)
    x = conv_transpose2d_stride2(x, w)
    x = blur(x, blur_kernel, ((p + 1) // 2 + 1, p // 2 + 1))
  else:
    x = conv2d(x, w, k // 2)
  if demodulate:
    # Σ_{i,kh,kw} (w[o,i]·s_i)² = Σ_i s_i² · Σ_{kh,kw} w[o,i]²
    wsq = jnp.sum(w * w, axis=(2, 3))                      # (out, in)
    d = jax.lax.rsqrt((style * style) @ wsq.T + 1e-8)      # (B, out)
    x = x * d[:, None, None, :].astype(x.dtype)
  return x


def _bilinear_matrix(n_in, n_out, align_corners):
  """(n_out, n_in) weights of torch's 1-D linear interpolation (no
  antialiasing: each output reads at most two inputs, also when shrinking)."""
  out = np.arange(n_out, dtype=np.float64)
  if align_corners:
    pos = out * ((n_in - 1) / max(n_out - 1, 1))
  else:
    # Half-pixel centres; torch clamps negative source positions to 0.
    pos = np.maximum((out + 0.5) * (n_in / n_out) - 0.5, 0.0)
  lo = np.minimum(np.floor(pos).astype(np.int64), n_in - 1)
  hi = np.minimum(lo + 1, n_in - 1)
  frac = pos - lo
  m = np.zeros((n_out, n_in), np.float64)
  m[np.arange(n_out), lo] += 1.0 - frac
  m[np.arange(n_out), hi] += frac
  return m


def resize_bilinear_torch(x, size, align_corners=False):
  """F.interpolate(x, size, mode='bilinear', align_corners=...) on NHWC.

  jax.image.resize cannot express align_corners=True, and with antialias it
  filters when shrinking where torch does not; a separable interpolation
  matrix per axis reproduces torch exactly either way.
  """
  mh = jnp.asarray(_bilinear_matrix(x.shape[1], size[0], align_corners),
                   x.dtype)
  mw = jnp.asarray(_bilinear_matrix(x.shape[2], size[1], align_corners),
                   x.dtype)
  hi = jax.lax.Precision.HIGHEST
  x = jnp.einsum("oh,bhwc->bowc", mh, x, precision=hi)
  return jnp.einsum("pw,bowc->bopc", mw, x, precision=hi)


def _adaptive_pool_matrix(n_in, n_out):
  """(n_out, n_in) weights of PyTorch's adaptive average pooling.

  Window i covers [floor(i·n_in/n_out), ceil((i+1)·n_in/n_out)), so windows
  overlap when n_out does not divide n_in.
  """
  m = np.zeros((n_out, n_in), np.float32)
  for i in range(n_out):
    start = (i * n_in) // n_out
    end = -((-(i + 1) * n_in) // n_out)
    m[i, start:end] = 1.0 / (end - start)
  return m


def adaptive_avg_pool(x, size):
  """NHWC `torch.nn.AdaptiveAvgPool2d(size)`, size an int."""
  h, w = x.shape[1:3]
  x = jnp.einsum("oh,bhwc->bowc", _adaptive_pool_matrix(h, size), x)
  return jnp.einsum("pw,bowc->bopc", _adaptive_pool_matrix(w, size), x)


def nearest_indices(n_in, n_out):
  """Source rows of torch's legacy `interpolate(mode='nearest')`:
  floor(i · (n_in / n_out)) in float32, clipped to n_in − 1."""
  scale = np.float32(n_in) / np.float32(n_out)
  idx = np.floor(np.arange(n_out, dtype=np.float32) * scale).astype(np.int64)
  return np.minimum(idx, n_in - 1)


def resize_nearest(x, size, axes=(1, 2)):
  """`x` resized along `axes` (default: H, W of NHWC) to `size`, picking
  elements as torch 'nearest' does; numpy or jax arrays."""
  rows = nearest_indices(x.shape[axes[0]], size[0])
  cols = nearest_indices(x.shape[axes[1]], size[1])
  return x.take(rows, axis=axes[0]).take(cols, axis=axes[1])


def resize_generated(image, size):
  """A generated image as the official DHR and HFGI code compare it with a
  256² view: clamped to [−1, 1], then `F.interpolate(mode='bilinear',
  align_corners=False)` (no antialiasing) to `size` (h, w)."""
  x = jnp.clip(image, -1.0, 1.0)
  if tuple(x.shape[1:3]) == tuple(size):
    return x
  return resize_bilinear_torch(x, size)
