"""Converts the differential-activation classifier (diff_cam_weight.pt) for dhr_jax.

    python -m converters.diffcam --src diff_cam_weight.pt --dst DIR

The released file is a plain state dict of `DiffCam(num_class)` from
HaoruiSong622/Editing-Out-of-Domain's `model/DA.py`: torchvision's
ResNet-101 children as `shared.*` (0 conv1, 1 bn1, 4 layer1, 5 layer2,
6–15 layer3[0..9]; 2 and 3 are the weightless relu and maxpool),
`classifier.*` (0–12 layer3[10..22], 13 layer4) and `fc.*`. The class
count is read from `fc.weight` (17 in the released file). DIR holds one
checkpoint of kind 'diffcam', read by `dhr_jax.load_diffcam(DIR)`.
"""
import sys

from converters.common import (ConversionError, check_keys, cli_main,
                               conv_to_hwio, f32, read_plain_state_dict)
from converters.e4e import bn_shapes, convert_bn

RELEASED = "pass diff_cam_weight.pt as released"


def official_prefix(name):
  """Flax block name ('layer3_12') → its key prefix in the released state
  dict ('classifier.2')."""
  from dhr_jax.models import diffcam as dc
  stage, i = name.split("_")
  i = int(i)
  if stage == "layer1":
    return f"shared.4.{i}"
  if stage == "layer2":
    return f"shared.5.{i}"
  if stage == "layer3" and i < dc.SHARED_LAYER3_BLOCKS:
    return f"shared.{6 + i}"
  if stage == "layer3":
    return f"classifier.{i - dc.SHARED_LAYER3_BLOCKS}"
  layer3_blocks = {s: n for s, _, n, _ in dc.STAGES}["layer3"]
  # layer4 follows layer3's blocks in `classifier`.
  return f"classifier.{layer3_blocks - dc.SHARED_LAYER3_BLOCKS}.{i}"


def _has_downsample(c_in, width, stride):
  from dhr_jax.models import diffcam as dc
  return stride != 1 or c_in != width * dc.EXPANSION


def expected_shapes(num_classes):
  """{official key: shape} of DiffCam(num_classes), counters excluded."""
  from dhr_jax.models import diffcam as dc
  shapes = {"shared.0.weight": (64, 3, 7, 7), **bn_shapes("shared.1", 64)}
  for name, c_in, width, stride in dc.block_specs():
    p = official_prefix(name)
    out = width * dc.EXPANSION
    shapes[f"{p}.conv1.weight"] = (width, c_in, 1, 1)
    shapes[f"{p}.conv2.weight"] = (width, width, 3, 3)
    shapes[f"{p}.conv3.weight"] = (out, width, 1, 1)
    for j, c in ((1, width), (2, width), (3, out)):
      shapes.update(bn_shapes(f"{p}.bn{j}", c))
    if _has_downsample(c_in, width, stride):
      shapes[f"{p}.downsample.0.weight"] = (out, c_in, 1, 1)
      shapes.update(bn_shapes(f"{p}.downsample.1", out))
  shapes["fc.weight"] = (num_classes, dc.FEATURES)
  shapes["fc.bias"] = (num_classes,)
  return shapes


def _convert_block(sd, p, has_downsample):
  out = {f"conv{j}": {"kernel": conv_to_hwio(sd[f"{p}.conv{j}.weight"])}
         for j in (1, 2, 3)}
  out.update({f"bn{j}": convert_bn(sd, f"{p}.bn{j}") for j in (1, 2, 3)})
  if has_downsample:
    out["downsample_conv"] = {
        "kernel": conv_to_hwio(sd[f"{p}.downsample.0.weight"])}
    out["downsample_bn"] = convert_bn(sd, f"{p}.downsample.1")
  return out


def convert_state_dict(state_dict, src="<state_dict>"):
  """Released state dict (numpy values) → (tree, config) for
  `dhr_jax.models.diffcam.DiffCam`. Raises ConversionError naming every
  missing, unexpected or mis-shaped key."""
  from dhr_jax.models import diffcam as dc
  fc = state_dict.get("fc.weight")
  if fc is None or "shared.0.weight" not in state_dict:
    raise ConversionError(
        f"{src}: not DiffCam's state dict (no shared.0.weight or fc.weight, "
        f"the keys of model/DA.py's DiffCam); {RELEASED}.")
  if getattr(fc, "ndim", 0) != 2 or fc.shape[0] < 1:
    raise ConversionError(
        f"{src}: fc.weight has shape {tuple(getattr(fc, 'shape', ()))}, "
        f"expected (classes, {dc.FEATURES}); {RELEASED}.")
  num_classes = int(fc.shape[0])
  ignore = [k for k in state_dict if k.endswith("num_batches_tracked")]
  check_keys(src, state_dict, expected_shapes(num_classes), ignore=ignore)
  sd = state_dict
  trunk = {"conv1": {"kernel": conv_to_hwio(sd["shared.0.weight"])},
           "bn1": convert_bn(sd, "shared.1")}
  classifier = {}
  for name, c_in, width, stride in dc.block_specs():
    p = official_prefix(name)
    part = trunk if p.startswith("shared.") else classifier
    part[name] = _convert_block(sd, p, _has_downsample(c_in, width, stride))
  params = {"trunk": trunk, "classifier": classifier,
            "fc": {"kernel": f32(sd["fc.weight"].T),
                   "bias": f32(sd["fc.bias"])}}
  return {"params": params}, dc.make_config(num_classes)


def convert(src, dst, overwrite=False):
  """Converts the file at `src` into the checkpoint directory `dst`;
  everything is checked before anything is written."""
  from dhr_jax import checkpoint
  from dhr_jax.models import diffcam as dc
  tree, config = convert_state_dict(
      read_plain_state_dict(src, RELEASED), src)
  return checkpoint.save(dst, tree, dc.KIND, config, overwrite=overwrite)


def main(argv=None):
  return cli_main(
      "Convert DiffCam, the differential-activation classifier of "
      "'Editing Out-of-domain GAN Inversion via Differential Activations'.",
      lambda args: convert(args.src, args.dst, args.overwrite), argv)


if __name__ == "__main__":
  sys.exit(main())
