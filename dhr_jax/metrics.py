"""Reconstruction metrics as the paper reports them.

The paper's Table 1 comes from GANInverter's `scripts/test.py`, which does
not score at the generator's resolution in floats (`image_metrics`
does): it scores the inversion as a saved picture, at 256², against the
input file resized to 256²:

  * the inversion is quantised (its `float2uint2float`): (x + 1) / 2 · 255,
    clamped to [0, 255], *truncated* to uint8 (`.to(torch.uint8)`), then
    back to [-1, 1] as u / 255 · 2 − 1;
  * it is resized to 256² by torch's antialiased bilinear interpolation
    (`F.interpolate(mode='bilinear', antialias=True, align_corners=False)`,
    what torchvision's tensor `Resize` does);
  * the target is the uint8 input resized to 256² by PIL's bilinear resize
    (torchvision's `Resize` on the PIL image), then u / 255 · 2 − 1;
  * per image: MSE over C, H, W on [-1, 1], PSNR = 10·log10(2 / MSE) (its
    formula: the peak-to-peak range of [-1, 1] is 2, but the formula takes
    2, not 2² = 4, so it reads 10·log10(2) ≈ 3.01 dB lower than PSNR on
    [0, 1]), and LPIPS-Alex.

The script prints the means over images of these per-image values.
"""
import jax
import jax.numpy as jnp
import numpy as np

from dhr_jax import io
from dhr_jax.models import lpips as lpips_lib

PAPER_SIZE = 256


def quantise(images):
  """`float2uint2float`: [-1, 1]-ish floats → the uint8 picture they truncate
  to → float32 in [-1, 1]. Non-finite values give 0 (test them first)."""
  x = np.asarray(images, np.float32)
  # Operation for operation as the float32 torch code, so that values on a
  # uint8 boundary truncate the same way.
  v = np.clip((x + np.float32(1)) / np.float32(2) * np.float32(255), 0, 255)
  u = np.where(np.isfinite(v), v, 0).astype(np.uint8)
  return (u.astype(np.float32) / np.float32(255) - np.float32(0.5)) / (
      np.float32(0.5))


def resize_antialiased(images, size=PAPER_SIZE):
  """(B, H, W, C) floats → (B, size, size, C): torch's `F.interpolate(
  mode='bilinear', antialias=True, align_corners=False)`. jax's antialiased
  linear resize is the same filter (tests/test_metrics.py measures ≤ 5e-7
  against torch for 1024/512/300/64/32 → 256)."""
  x = jnp.asarray(images)
  if tuple(x.shape[1:3]) == (size, size):
    return x
  return jax.image.resize(x, (x.shape[0], size, size, x.shape[3]), "linear",
                          antialias=True)


@jax.jit
def lpips_distance(lpips, x, y):
  """`lpips.distance(lpips.params, x, y)` compiled once per net and input
  shapes: the metric is a pytree, so its weights are arguments, not
  constants baked into each program (the run's and the paper's metrics
  share this one function)."""
  return lpips.distance(lpips.params, x, y)


def paper_metrics(inversions, targets_u8, lpips_alex=None):
  """The per-image metrics of GANInverter's scripts/test.py (module doc).

  Args:
    inversions: (B, H, W, 3) floats in [-1, 1], not clamped (the generator's
      output as it is; the quantisation clamps).
    targets_u8: (B, H', W', 3) uint8, the input pictures.
    lpips_alex: a loaded LPIPS-Alex (`dhr_jax.models.lpips.load('alex')`), loaded
      when not given.

  Returns:
    {'mse', 'psnr', 'lpips'}: (B,) float64 numpy arrays; NaN for an image
    whose inversion has non-finite values.
  """
  inversions = np.asarray(inversions)
  targets_u8 = np.asarray(targets_u8)
  if inversions.ndim != 4 or inversions.shape[-1] != 3:
    raise ValueError("inversions must be (B, H, W, 3), got shape "
                     f"{inversions.shape}")
  if targets_u8.dtype != np.uint8 or targets_u8.ndim != 4 or (
      targets_u8.shape[0] != inversions.shape[0]) or targets_u8.shape[-1] != 3:
    raise ValueError(f"targets_u8 must be ({inversions.shape[0]}, H, W, 3) "
                     f"uint8, got {targets_u8.dtype} {targets_u8.shape}")
  if lpips_alex is None:
    lpips_alex = lpips_lib.load("alex")
  finite = np.all(np.isfinite(inversions), axis=(1, 2, 3))
  x = resize_antialiased(quantise(inversions))
  y = jnp.asarray((io.resize_uint8(targets_u8, PAPER_SIZE).astype(np.float32)
                   / np.float32(255) - np.float32(0.5)) / np.float32(0.5))
  d = np.asarray(x, np.float64) - np.asarray(y, np.float64)
  mse = np.mean(d * d, axis=(1, 2, 3))
  with np.errstate(divide="ignore"):
    psnr = 10.0 * np.log10(2.0 / mse)
  lp = np.asarray(lpips_distance(lpips_alex, x, y), np.float64)
  nan = np.where(finite, 0.0, np.nan)
  return dict(mse=mse + nan, psnr=psnr + nan, lpips=lp + nan)


# --------------------------------------------------------------------------
# A run's metrics: the paper's beside full-resolution float ones

# The paper's protocol (`paper_metrics`: the inversion as a truncated
# uint8 picture, both images at 256², MSE on [-1, 1], PSNR = 10·log10(2/MSE),
# LPIPS-Alex), beside full-resolution float metrics (`image_metrics`).
PAPER_METRICS = ("paper_mse", "paper_psnr", "paper_lpips_alex")
METRICS = ("mse", "psnr", "lpips_alex", "lpips_vgg", "in_domain",
           "out_of_domain") + PAPER_METRICS


def psnr(mse):
  """PSNR in dB for images in [0, 1]."""
  return float("inf") if mse <= 0 else float(10.0 * np.log10(1.0 / mse))


def image_metrics(image, target, mask, lpips_alex, lpips_vgg):
  """Per-image metrics of a batch as a list of dicts.

  image, target: (B, H, W, 3) in [-1, 1] (image is clipped to it, as it is
  saved); mask: (B, H, W, 1), 1 = in-domain. MSE and PSNR are on [0, 1].
  The paper_* entries are `metrics.paper_metrics` of the unclipped image.
  """
  # LPIPS on the device arrays as given; only MSE needs host copies.
  xa = jnp.clip(jnp.asarray(image, jnp.float32), -1.0, 1.0)
  ya = jnp.asarray(target, jnp.float32)
  x, y = np.asarray(xa), np.asarray(ya)
  mse = np.mean(((x - y) / 2.0) ** 2, axis=(1, 2, 3))
  alex = np.asarray(lpips_distance(lpips_alex, xa, ya))
  vgg = np.asarray(lpips_distance(lpips_vgg, xa, ya))
  inside = np.mean(np.asarray(mask, np.float32), axis=(1, 2, 3))
  # The uint8 target is the input as inverted (the pixels written as
  # input.png): `loop.BatchLoop` loads each file as u / 127.5 − 1 at the
  # generator's size, which io.to_uint8 maps back to u exactly. (The
  # official script resizes the file itself; the same picture for inputs at
  # the generator's size, such as FFHQ-aligned 1024² crops.)
  paper = paper_metrics(image, io.to_uint8(y), lpips_alex)
  return [dict(mse=float(mse[i]), psnr=psnr(mse[i]),
               lpips_alex=float(alex[i]), lpips_vgg=float(vgg[i]),
               in_domain=float(inside[i]), out_of_domain=float(1 - inside[i]),
               paper_mse=float(paper["mse"][i]),
               paper_psnr=float(paper["psnr"][i]),
               paper_lpips_alex=float(paper["lpips"][i]))
          for i in range(x.shape[0])]

