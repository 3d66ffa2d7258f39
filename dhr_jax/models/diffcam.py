"""DiffCam: where an edit acts, from a classifier's differential activations.

Song et al., "Editing Out-of-domain GAN Inversion via Differential
Activations" (ECCV 2022); published code: HaoruiSong622/Editing-Out-of-Domain,
`model/DA.py` and `image_process.py`. A torchvision ResNet-101 is split in
two. Its first part — conv1, bn1, relu, maxpool, layer1, layer2 and
layer3[:10] (`shared` in the released checkpoint) — runs on the inversion
and on the manipulated (edited) image; the rest — layer3[10:], layer4,
average pooling and a linear layer to the attribute classes (`classifier`,
`fc`) — classifies the difference of their features (manipulated minus
inversion). Grad-CAM of the edit's attribute at layer4's output is the
heat map that says where the edited image replaces the photo.

Input: x6 (B, H, W, 6), channels 0–2 the inversion, 3–5 the manipulated
image, both in [-1, 1] with no ImageNet normalisation (the published code
feeds pSp's raw output and the generator's pooled output, and trained on
the same). The published inference runs at 256² (the inversion is pSp's
256² output, the manipulated image the generator's 1024² output
average-pooled to 256²); any size works here.

Nothing here is trained, so BatchNorm is `irse.FrozenBatchNorm` (running
statistics in `params`).

Convert the released file with
`python -m converters.diffcam --src diff_cam_weight.pt --dst DIR` and load
it with `dhr_jax.load_diffcam(DIR)`; `dhr_jax.diff_cam` makes heat maps.
"""
import functools
import os
from typing import Any

import flax.linen as nn
from flax import struct
import jax
import jax.numpy as jnp
import numpy as np

from dhr_jax import checkpoint
from dhr_jax.models import ops
from dhr_jax.models.frozen import freeze
from dhr_jax.models.irse import FrozenBatchNorm, pad1

KIND = "diffcam"
EXPANSION = 4          # torchvision Bottleneck: out channels = 4 · width
FEATURES = 2048        # layer4's channels, fc's input
# ResNet-101: (stage, width, blocks, stride of the first block).
STAGES = (("layer1", 64, 3, 1), ("layer2", 128, 4, 2),
          ("layer3", 256, 23, 2), ("layer4", 512, 3, 2))
SHARED_LAYER3_BLOCKS = 10  # layer3[:10] belongs to the shared trunk

# The published directions and the class the released classifier gives each
# (`direction2idx` of image_process.py). The classifier was trained on 17
# directions (the sorted file names of its training folder); only these seven
# are published, so the other ten classes have no name.
DIRECTION_CLASSES = {
    "Beard": 12,
    "Bushy_Eyebrows": 6,
    "Eyeglasses": 7,
    "Mouth_Open": 10,
    "Narrow_Eyes": 11,
    "Old": 16,
    "Smiling": 15,
}


def direction_class(name):
  """The classifier's class index of a published direction, by name
  ('Smiling') or by its file ('directions/Smiling.npy': the published code
  takes the name from the file name). Raises ValueError naming the known
  directions."""
  key = os.path.splitext(os.path.basename(os.fspath(name)))[0]
  if key not in DIRECTION_CLASSES:
    raise ValueError(
        f"{name}: not one of the directions the DiffCam classifier was "
        f"published with ({', '.join(sorted(DIRECTION_CLASSES))}); name the "
        "direction file after one of them.")
  return DIRECTION_CLASSES[key]


def block_specs():
  """[(name, in_channels, width, stride)] of ResNet-101's 33 bottlenecks in
  the order they run, named like torchvision ('layer3_12' is
  layer3[12])."""
  specs, c_in = [], 64
  for stage, width, blocks, stride in STAGES:
    for i in range(blocks):
      specs.append((f"{stage}_{i}", c_in, width, stride if i == 0 else 1))
      c_in = width * EXPANSION
  return specs


def _is_shared(name):
  stage, i = name.split("_")
  return stage in ("layer1", "layer2") or (
      stage == "layer3" and int(i) < SHARED_LAYER3_BLOCKS)


class Bottleneck(nn.Module):
  """torchvision's Bottleneck (ResNet v1.5: the stride on the 3×3 conv)."""
  in_channels: int
  width: int
  stride: int

  @nn.compact
  def __call__(self, x):
    out_channels = self.width * EXPANSION
    s = (self.stride, self.stride)
    shortcut = x
    if self.stride != 1 or self.in_channels != out_channels:
      shortcut = nn.Conv(out_channels, (1, 1), s, padding="VALID",
                         use_bias=False, name="downsample_conv")(x)
      shortcut = FrozenBatchNorm(name="downsample_bn")(shortcut)
    r = nn.Conv(self.width, (1, 1), use_bias=False, name="conv1")(x)
    r = nn.relu(FrozenBatchNorm(name="bn1")(r))
    r = nn.Conv(self.width, (3, 3), s, padding=pad1(), use_bias=False,
                name="conv2")(r)
    r = nn.relu(FrozenBatchNorm(name="bn2")(r))
    r = nn.Conv(out_channels, (1, 1), use_bias=False, name="conv3")(r)
    r = FrozenBatchNorm(name="bn3")(r)
    return nn.relu(r + shortcut)


class Trunk(nn.Module):
  """The shared part (`shared`): one image (B, H, W, 3) → features
  (B, H/16, W/16, 1024)."""

  @nn.compact
  def __call__(self, x):
    x = nn.Conv(64, (7, 7), (2, 2), padding=((3, 3), (3, 3)),
                use_bias=False, name="conv1")(x)
    x = nn.relu(FrozenBatchNorm(name="bn1")(x))
    # MaxPool2d(3, 2, padding=1) pads with -inf, as nn.max_pool does.
    x = nn.max_pool(x, (3, 3), (2, 2), padding=((1, 1), (1, 1)))
    for name, c_in, width, stride in block_specs():
      if _is_shared(name):
        x = Bottleneck(c_in, width, stride, name=name)(x)
    return x


class Classifier(nn.Module):
  """layer3[10:] and layer4 of `classifier`: feature difference → layer4's
  output (B, H/32, W/32, 2048), the Grad-CAM layer."""

  @nn.compact
  def __call__(self, x):
    for name, c_in, width, stride in block_specs():
      if not _is_shared(name):
        x = Bottleneck(c_in, width, stride, name=name)(x)
    return x


class DiffCamNet(nn.Module):
  """x6 (B, H, W, 6) → attribute logits (B, num_classes); `activations`
  and `head` are the two halves Grad-CAM splits it into."""
  num_classes: int

  def setup(self):
    self.trunk = Trunk()
    self.classifier = Classifier()
    self.fc = nn.Dense(self.num_classes)

  def activations(self, x6):
    inverted, manipulated = x6[..., :3], x6[..., 3:]
    # One trunk call on both halves: the same weights, half the dispatches.
    feats = self.trunk(jnp.concatenate([inverted, manipulated], axis=0))
    feat_inverted, feat_manipulated = jnp.split(feats, 2, axis=0)
    return self.classifier(feat_manipulated - feat_inverted)

  def head(self, act):
    return self.fc(jnp.mean(act, axis=(1, 2)))

  def __call__(self, x6):
    return self.head(self.activations(x6))


def make_config(num_classes):
  return {"num_classes": int(num_classes)}


def _check_x6(x6):
  x6 = jnp.asarray(x6, jnp.float32)
  if x6.ndim != 4 or x6.shape[-1] != 6:
    raise ValueError(
        "DiffCam expects x6 (B, H, W, 6): the inversion (channels 0–2) and "
        f"the manipulated image (3–5) in [-1, 1], got shape {x6.shape}")
  return x6


@functools.partial(jax.jit, static_argnames=("config",))
def _logits(config, params, x6):
  return DiffCamNet(config["num_classes"]).apply({"params": params}, x6)


@struct.dataclass
class DiffCam:
  """A loaded DiffCam, as a pytree (params are leaves, the config static),
  so it can be passed to jitted functions.

  Attributes:
    params: the Flax parameters ({'trunk', 'classifier', 'fc'}; BatchNorm
      statistics included).
    config: read-only dict with num_classes.
  """
  params: Any
  config: dict = struct.field(pytree_node=False)

  def __post_init__(self):
    object.__setattr__(self, "config", freeze(self.config))

  @property
  def net(self):
    return DiffCamNet(num_classes=self.config["num_classes"])

  @property
  def num_classes(self):
    return self.config["num_classes"]

  def logits(self, params, x6):
    """Attribute logits (B, num_classes) of x6 (B, H, W, 6): channels 0–2
    the inversion, 3–5 the manipulated image, both in [-1, 1]."""
    return _logits(self.config, params, _check_x6(x6))


def heat_maps(model, x6, targets):
  """`diff_cam` without its checks and jit, for use inside a traced
  function: x6 (B, H, W, 6) float32, targets (B,) int32 in range."""
  net, variables = model.net, {"params": model.params}
  act = net.apply(variables, x6, method=DiffCamNet.activations)
  logits, pullback = jax.vjp(
      lambda a: net.apply(variables, a, method=DiffCamNet.head), act)
  # d(Σ_i logits[i, targets_i]) / d logits is the targets' one-hot rows.
  (grad,) = pullback(jax.nn.one_hot(targets, logits.shape[-1],
                                    dtype=logits.dtype))
  weights = jnp.mean(grad, axis=(1, 2))
  cam = jnp.einsum("bc,bhwc->bhw", weights, act,
                   precision=jax.lax.Precision.HIGHEST)
  cam = jnp.maximum(cam, 0.0)
  # F.interpolate(mode='bilinear'), align_corners=False, no antialiasing.
  cam = ops.resize_bilinear_torch(cam[..., None], x6.shape[1:3])[..., 0]
  cam = cam - jnp.min(cam, axis=(1, 2), keepdims=True)
  peak = jnp.max(cam, axis=(1, 2), keepdims=True)
  # A flat map (no positive evidence anywhere) is 0/0 = NaN in the published
  # code; here it is all zeros: no region to edit.
  return jnp.where(peak > 0, cam / jnp.where(peak > 0, peak, 1.0), 0.0)


_heat_maps = jax.jit(heat_maps)


def diff_cam(model, x6, targets):
  """Grad-CAM heat maps (B, H, W) in [0, 1] of the classes `targets` at
  layer4's output, as the published `DiffCam.cam` computes them.

  model: a `DiffCam` (`dhr_jax.load_diffcam`). x6: (B, H, W, 6), channels 0–2 the
  inversion, 3–5 the manipulated image, in [-1, 1]. targets: one class
  index for every image, or (B,) indices (`direction_class` maps a
  published direction's name to its class).

  The gradient of Σ_i logits[i, targets_i] with respect to layer4's output
  (`jax.vjp`) is averaged over space into channel weights; the weighted sum
  of layer4's channels, clipped at zero, is resized bilinearly
  (align_corners=False) to (H, W) and min-max normalised per image.

  An image whose map is flat (e.g. no channel evidence survives the ReLU)
  has no edit region: its map is all zeros (the published code divides
  0 by 0 and returns NaN). Any other map reaches 1, so `empty_maps` tells
  such images apart for a warning.

  Differences from the published code: it resizes the map to (W, H)
  (`shape[-2:][::-1]`), which only agrees for square inputs; here the map
  has the input's (H, W). It runs one image at a time; here the batch is
  one jitted program.
  """
  x6 = _check_x6(x6)
  targets = check_targets(model, targets, x6.shape[0])
  return _heat_maps(model, x6, jnp.asarray(targets, jnp.int32))


def check_targets(model, targets, b):
  """One class index or b of them → (b,) indices of `model`'s classes;
  anything else is a ValueError naming what was given."""
  targets = np.asarray(targets)
  if targets.ndim == 0:
    targets = np.full((b,), targets)
  if targets.shape != (b,) or not np.issubdtype(targets.dtype, np.integer):
    raise ValueError(f"targets: one class index or {b} integer indices, "
                     f"got {targets!r}")
  n = model.num_classes
  if targets.min() < 0 or targets.max() >= n:
    raise ValueError(f"targets {targets.tolist()}: DiffCam has {n} classes "
                     f"(0–{n - 1})")
  return targets


def empty_maps(heat):
  """(B,) bool: which heat maps of `diff_cam` are all zeros, i.e. had no
  edit region (NaN in the published code); the caller warns. Traceable."""
  return jnp.max(heat, axis=(1, 2)) <= 0


def param_shapes(num_classes):
  """Shapes of the Flax parameter tree, no compute."""
  x = jax.ShapeDtypeStruct((1, 64, 64, 6), jnp.float32)
  return jax.eval_shape(DiffCamNet(num_classes).init, jax.random.PRNGKey(0),
                        x)["params"]


def load(path):
  """Loads a converted DiffCam (a directory, or a bundle holding diffcam/).

  Convert the released PyTorch file first: `python -m converters.diffcam
  --src diff_cam_weight.pt --dst DIR`.
  """
  directory = checkpoint.find(path, KIND)
  tree, config = checkpoint.load(directory, KIND)
  n = config.get("num_classes") if isinstance(config, dict) else None
  if (set(tree) != {"params"} or not isinstance(n, int) or n < 1
      or config != make_config(n)):
    raise checkpoint.CheckpointError(
        f"{directory} is not a DiffCam written by converters.diffcam "
        f"(entries {sorted(tree)}, config {config}); re-run the converter.")
  return DiffCam(params=tree["params"], config=config)
