"""Edit directions and components on disk: InterFaceGAN directions and
GANSpace's principal components of W, read safely (no pickles executed).

InterFaceGAN directions as distributed with GAN-inversion code (e4e, HFGI,
PTI: age.pt, smile.pt, pose.pt) are PyTorch tensors of shape (1, 512) or
(1, 18, 512); InterFaceGAN's own boundaries are .npy arrays of shape
(1, 512). GANSpace components come as GANSpace's cache npz or e4e/HFGI's
`ffhq_pca.pt` (see `load_ganspace`). `dhr_jax.editing` applies them.
"""
import dataclasses
import os
from typing import Optional

import numpy as np

from dhr_jax import checkpoint

_TORCH_SUFFIXES = (".pt", ".pth")


class EditError(ValueError):
  """A direction or component file, or an edit specification, is unusable."""


# --------------------------------------------------------------------------
# Files


def _torch_load(path):
  """A .pt file read safely onto the CPU (files saved from GPU included)."""
  try:
    import torch
  except ImportError:
    raise EditError(
        f"{path} is a PyTorch file and reading it needs PyTorch (CPU): "
        "pip install -e '.[convert]' (or save the array as .npy/.npz).") from None
  try:
    return torch.load(path, map_location="cpu", weights_only=True)
  except Exception as e:  # torch raises many types for a bad file
    raise EditError(
        f"{path}: not a tensor file this reads "
        f"({checkpoint.torch_refusal(e)}). Pass the file as distributed, or "
        "save the array as .npy/.npz.") from None


def _as_float(path, name, value):
  if hasattr(value, "detach"):  # a torch tensor
    value = value.detach().cpu().float().numpy()
  try:
    a = np.asarray(value, dtype=np.float32)
  except (TypeError, ValueError):
    raise EditError(f"{path}: {name} is a {type(value).__name__}, "
                    "expected a numeric array") from None
  if not np.all(np.isfinite(a)):
    raise EditError(f"{path}: {name} contains NaN or inf")
  return a


def _check_exists(path, what):
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise EditError(f"{path}: no such {what} file")
  return path


def _np_load(path):
  try:
    return np.load(path, allow_pickle=False)
  except ValueError as e:
    if "pickle" in str(e):
      raise EditError(
          f"{path} holds pickled Python objects, which are not loaded (unsafe)."
          " Save plain arrays: np.save for a direction, np.savez(path, "
          "components=..., mean=..., std=...) for GANSpace components.") from None
    raise EditError(f"{path}: not a readable numpy file ({e})") from None
  except OSError as e:
    raise EditError(f"{path}: not a readable numpy file ({e})") from None


def load_direction(path):
  """Reads an InterFaceGAN direction from `.npy` or a PyTorch `.pt`/`.pth`.

  Accepted shapes: (D,) or (1, D) — one direction for every layer — and
  (L, D) or (1, L, D) — one per W+ layer. Returns float32 numpy of shape
  (D,) or (L, D). `.pt` files must hold a single tensor (needs PyTorch).
  """
  path = _check_exists(path, "direction")
  suffix = os.path.splitext(path)[1].lower()
  if suffix == ".npy":
    value = _np_load(path)
  elif suffix in _TORCH_SUFFIXES:
    value = _torch_load(path)
    if isinstance(value, dict):
      raise EditError(
          f"{path} holds a dict (keys {sorted(map(str, value))}), expected a "
          "single direction tensor of shape (1, D) or (1, L, D).")
  else:
    raise EditError(f"{path}: unknown direction format {suffix!r}; use .npy "
                    "or a PyTorch .pt/.pth tensor")
  n = _as_float(path, "the direction", value)
  if n.ndim == 3 and n.shape[0] == 1:
    n = n[0]
  elif n.ndim == 2 and n.shape[0] == 1:
    n = n[0]
  if n.ndim not in (1, 2) or n.size == 0:
    raise EditError(
        f"{path}: direction has shape {tuple(np.shape(value))}, expected (D,), "
        "(1, D), (L, D) or (1, L, D)")
  if not np.any(n):
    raise EditError(f"{path}: the direction is all zeros")
  return n


@dataclasses.dataclass(frozen=True)
class PrincipalComponents:
  """GANSpace W-space PCA.

  components: (K, D) unit directions v_c;  std: (K,) σ_c, the spread of W
  along v_c;  mean: (D,) μ, the mean of W (only `mode="set"` needs it).
  """
  components: np.ndarray
  std: np.ndarray
  mean: Optional[np.ndarray] = None

  def __post_init__(self):
    for name in ("components", "std", "mean"):
      value = getattr(self, name)
      if value is not None:
        object.__setattr__(self, name, _as_float(
            "PrincipalComponents", name, value))
    _check_components(self.components, self.std, self.mean,
                      "PrincipalComponents")


def _check_components(comp, std, mean, source):
  if np.ndim(comp) != 2:
    raise EditError(f"{source}: components must be (K, D), got "
                    f"{np.shape(comp)}")
  k, d = np.shape(comp)
  if np.shape(std) != (k,):
    raise EditError(f"{source}: std must be ({k},) for {k} components, got "
                    f"{np.shape(std)}")
  if mean is not None and np.shape(mean) != (d,):
    raise EditError(f"{source}: mean must be ({d},) for {d}-dim components, "
                    f"got {np.shape(mean)}")


# Keys in the files GANSpace writes (`lat_*`, an npz) and the ones e4e/HFGI
# ship (`comp`, `mean`, `std`, a .pt dict); first match wins.
_COMPONENT_KEYS = ("components", "comp", "lat_comp")
_MEAN_KEYS = ("mean", "lat_mean")
_STD_KEYS = ("std", "stdev", "lat_stdev")


def _pick(path, arrays, keys, what, required=True):
  for k in keys:
    if k in arrays:
      return _as_float(path, f"{what} ({k!r})", arrays[k])
  if required:
    raise EditError(
        f"{path} has no {what}: expected one of the keys {', '.join(keys)}; "
        f"found {', '.join(sorted(map(str, arrays))) or 'none'}")
  return None


def _squeeze_to(a, ndim):
  """Drops singleton axes (GANSpace stores (K, 1, D), (1, D), (K, 1))."""
  if a is None or a.ndim <= ndim:
    return a
  axes = tuple(i for i, s in enumerate(a.shape) if s == 1)[:a.ndim - ndim]
  return np.squeeze(a, axes) if axes else a


def load_ganspace(path):
  """Reads GANSpace principal components of W from `.npz` or `.pt`.

  The file is a mapping (an `.npz` archive, or a PyTorch dict of tensors)
  with
    components: key 'components', 'comp' (e4e/HFGI `ffhq_pca.pt`) or
                'lat_comp' (GANSpace's cache npz, computed with --use_w so
                that its latent space is W); (K, D) or (K, 1, D);
    std:        'std', 'stdev' or 'lat_stdev'; (K,) or (K, 1);
    mean:       'mean' or 'lat_mean'; (D,), (1, D) or (1, 1, D); optional.
  Other keys (GANSpace's 'act_comp', 'var_ratio', ...) are ignored.
  A `.npy` file cannot hold the three arrays and is refused with a hint.
  """
  path = _check_exists(path, "GANSpace components")
  suffix = os.path.splitext(path)[1].lower()
  if suffix == ".npz":
    with _np_load(path) as z:
      arrays = {k: z[k] for k in z.files}
  elif suffix in _TORCH_SUFFIXES:
    arrays = _torch_load(path)
    if not isinstance(arrays, dict):
      raise EditError(
          f"{path} holds a {type(arrays).__name__}, expected a dict with "
          "'comp', 'mean' and 'std' tensors (as e4e's ffhq_pca.pt)")
  elif suffix == ".npy":
    raise EditError(
        f"{path}: a .npy file holds one array, GANSpace needs components and "
        "their std (and mean): save them together with np.savez(path, "
        "components=C, std=S, mean=M) and pass the .npz")
  else:
    raise EditError(f"{path}: unknown GANSpace format {suffix!r}; use .npz or "
                    "a PyTorch .pt/.pth dict")
  comp = _squeeze_to(_pick(path, arrays, _COMPONENT_KEYS, "components"), 2)
  std = _squeeze_to(_pick(path, arrays, _STD_KEYS, "std"), 1)
  mean = _squeeze_to(_pick(path, arrays, _MEAN_KEYS, "mean", False), 1)
  _check_components(comp, std, mean, path)  # errors name the file
  return PrincipalComponents(comp, std, mean)
