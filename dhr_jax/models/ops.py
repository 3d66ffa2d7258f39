"""StyleGAN2 building blocks as pure functions on NHWC arrays.

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


def _depthwise(x, kernel, padding, lhs_dilation=(1, 1)):
  """Per-channel correlation with a fixed 2-D FIR kernel.

  The official upfirdn2d flips the kernel before correlating; our kernels are
  symmetric, but we flip anyway so any kernel behaves the same.
  """
  c = x.shape[-1]
  k = jnp.asarray(kernel[::-1, ::-1], x.dtype)
  k = jnp.tile(k[:, :, None, None], (1, 1, 1, c))
  return jax.lax.conv_general_dilated(
      x, k, window_strides=(1, 1), padding=padding, lhs_dilation=lhs_dilation,
      dimension_numbers=_NHWC, feature_group_count=c)


def blur(x, kernel, pad):
  """upfirdn2d(x, kernel, up=1, down=1, pad=(pad0, pad1))."""
  p0, p1 = pad
  return _depthwise(x, kernel, [(p0, p1), (p0, p1)])


def upsample_2x(x, kernel, pad):
  """upfirdn2d(x, kernel, up=2, pad=(pad0, pad1)).

  Zero-insertion upsampling leaves a trailing zero after the last sample;
  lhs_dilation does not, so it is added to the far padding.
  """
  p0, p1 = pad
  return _depthwise(x, kernel, [(p0, p1 + 1), (p0, p1 + 1)], lhs_dilation=(2, 2))


def _conv2d(x, weight, padding):
  w = jnp.transpose(weight, (2, 3, 1, 0))
  return jax.lax.conv_general_dilated(
      x, w, (1, 1), [(padding, padding)] * 2, dimension_numbers=_NHWC)


def _conv_transpose2d_stride2(x, weight):
  k = weight.shape[-1]
  w = jnp.transpose(weight[:, :, ::-1, ::-1], (2, 3, 1, 0))
  return jax.lax.conv_general_dilated(
      x, w, (1, 1), [(k - 1, k - 1)] * 2, lhs_dilation=(2, 2),
      dimension_numbers=_NHWC)


def _tap_weight_grad(x, g, k, stride):
  """dL/dW (out, in, k, k) of a k×k convolution as k² matrix products.

  Tap (ty, tx) of the weight meets the input and the output gradient at a
  fixed shift: stride 1 (padded input x): Σ x[:, h+ty, w+tx] ⊗ g[:, h, w];
  stride 2 (transposed, unpadded x): Σ x[:, h, w] ⊗ g[:, 2h+ty, 2w+tx].
  """
  n, h, w = (g if stride == 1 else x).shape[:3]
  taps = []
  for ty in range(k):
    for tx in range(k):
      if stride == 1:
        a, b = x[:, ty:ty + h, tx:tx + w], g
      else:
        a, b = x, g[:, ty:ty + 2 * h - 1:2, tx:tx + 2 * w - 1:2]
      taps.append(jnp.einsum("nhwi,nhwo->oi", a, b))
  return jnp.stack(taps, -1).reshape(taps[0].shape + (k, k))


# XLA's CPU backward-filter convolution is slow: ~45× the forward for the
# stride-2 transposed conv, and far slower again inside a while loop, which
# is where refinement and embedding run (jax-ml/jax#12868). On CPU the
# weight gradient is therefore taken as k² GEMMs (_tap_weight_grad); other
# backends keep their own convolution gradient. Forward values and input
# gradients are XLA's on every backend.


def _weight_grad(conv, x, weight, g, tap_grad):
  native = lambda x, g: jax.vjp(lambda w: conv(x, w), weight)[1](g)[0]
  return jax.lax.platform_dependent(x, g, cpu=tap_grad, default=native)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def conv2d(x, weight, padding):
  """x NHWC, weight (out, in, kh, kw) as in PyTorch; cross-correlation."""
  return _conv2d(x, weight, padding)


def _conv2d_fwd(x, weight, padding):
  return _conv2d(x, weight, padding), (x, weight)


def _conv2d_bwd(padding, res, g):
  x, weight = res
  conv = lambda x, w: _conv2d(x, w, padding)
  dx = jax.vjp(lambda x: conv(x, weight), x)[1](g)[0]
  p = ((0, 0), (padding, padding), (padding, padding), (0, 0))
  taps = lambda x, g: _tap_weight_grad(jnp.pad(x, p), g, weight.shape[-1], 1)
  return dx, _weight_grad(conv, x, weight, g, taps)


conv2d.defvjp(_conv2d_fwd, _conv2d_bwd)


@jax.custom_vjp
def conv_transpose2d_stride2(x, weight):
  """PyTorch conv_transpose2d(x, weight.transpose(0, 1), stride=2, padding=0).

  weight is (out, in, k, k). A strided transposed convolution is a plain
  convolution of the zero-dilated input with the spatially flipped kernel.
  """
  return _conv_transpose2d_stride2(x, weight)


def _conv_transpose_fwd(x, weight):
  return _conv_transpose2d_stride2(x, weight), (x, weight)


def _conv_transpose_bwd(res, g):
  x, weight = res
  conv = _conv_transpose2d_stride2
  dx = jax.vjp(lambda x: conv(x, weight), x)[1](g)[0]
  taps = lambda x, g: _tap_weight_grad(x, g, weight.shape[-1], 2)
  return dx, _weight_grad(conv, x, weight, g, taps)


conv_transpose2d_stride2.defvjp(_conv_transpose_fwd, _conv_transpose_bwd)


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
