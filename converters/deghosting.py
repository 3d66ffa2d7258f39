"""Converts the deghosting network of differential-activation editing
(deghosting.pt of HaoruiSong622/Editing-Out-of-Domain) for dhr_jax.

    python -m converters.deghosting --src deghosting.pt --dst DIR

The file is a plain state dict of `Deghosting(in_size, out_size)`
(`image_process.py` loads it with `load_state_dict`): `FCN.*` (RRDB
encoder, fusion convs, pixel-shuffle decoder) and `generator.*`, mmediting's
StyleGANv2Generator. Its sizes (in_size, out_size, channels, RRDB width,
growth and block count) are read off the shapes. The generator is this
project's under mmediting's names: `style_mapping.N.linear.weight_orig` is
`style.N.weight`, `X.conv.style_modulation.*` is `X.conv.modulation.*`,
`noise_injector` is `noise`, `injected_noise_i` is `noises.noise_i`
(`weight_orig` is the unscaled weight that both scale by gain/√fan_in·lr_mul
at run time); it is converted by converters/stylegan2.py with config
pixel_norm 'mmediting', the one place the two compute differently. DIR
holds one checkpoint of kind 'deghosting', read by
`dhr_jax.load_deghosting(DIR)`.
"""
import math
import re
import sys

import jax
import numpy as np

from converters import stylegan2 as sg2
from converters.common import (ConversionError, check_keys, cli_main,
                               conv_to_hwio, f32, read_plain_state_dict)

# mmediting → rosinality generator names; the first matching rule applies.
_TO_ROSINALITY = (
    (r"^style_mapping\.(\d+)\.linear\.weight_orig$", r"style.\1.weight"),
    (r"^style_mapping\.(\d+)\.bias$", r"style.\1.bias"),
    (r"^constant_input\.input$", "input.input"),
    (r"^injected_noise_(\d+)$", r"noises.noise_\1"),
    (r"\.style_modulation\.linear\.weight_orig$", ".modulation.weight"),
    (r"\.style_modulation\.bias$", ".modulation.bias"),
    (r"\.conv\.weight_orig$", ".conv.weight"),
    (r"\.noise_injector\.weight$", ".noise.weight"),
)
_TO_MMEDITING = (
    (r"^style\.(\d+)\.weight$", r"style_mapping.\1.linear.weight_orig"),
    (r"^style\.(\d+)\.bias$", r"style_mapping.\1.bias"),
    (r"^input\.input$", "constant_input.input"),
    (r"^noises\.noise_(\d+)$", r"injected_noise_\1"),
    (r"\.modulation\.weight$", ".style_modulation.linear.weight_orig"),
    (r"\.modulation\.bias$", ".style_modulation.bias"),
    (r"\.conv\.weight$", ".conv.weight_orig"),
    (r"\.noise\.weight$", ".noise_injector.weight"),
)
_RELEASED = "pass deghosting.pt as released"


def _rename(name, rules):
  for pattern, repl in rules:
    new, n = re.subn(pattern, repl, name)
    if n:
      return new
  return name


def to_rosinality(name):
  """mmediting generator key → the rosinality key converters.stylegan2 reads."""
  return _rename(name, _TO_ROSINALITY)


def to_mmediting(name):
  return _rename(name, _TO_MMEDITING)


def fcn_torch_name(path):
  """FCN parameter path ('encoder_0', 'body_3_rdb1', 'conv1', 'kernel') →
  released key 'FCN.encoder.0.body.3.rdb1.conv1.weight'."""
  *mods, leaf = path
  name = re.sub(r"_(\d+)", r".\1", ".".join(mods)).replace("_rdb", ".rdb")
  return f"FCN.{name}.{'weight' if leaf == 'kernel' else leaf}"


def _count(sd, pattern):
  return len([k for k in sd if re.fullmatch(pattern, k)])


def infer_config(sd, src):
  """The architecture from the state dict's shapes."""
  from dhr_jax.models import deghosting as dg
  gen = {k[len("generator."):]: v for k, v in sd.items()
         if k.startswith("generator.")}
  try:
    g_config = sg2.infer_config(
        {to_rosinality(k): v for k, v in gen.items()}, src)
  except ConversionError:
    raise ConversionError(
        f"{src}: its 'generator.*' entries are not mmediting's "
        f"StyleGANv2Generator (e.g. no generator.constant_input.input); "
        f"{_RELEASED}.") from None
  g_config["pixel_norm"] = "mmediting"
  try:
    first = np.shape(sd["FCN.encoder.0.conv_first.weight"])
    growth = np.shape(sd["FCN.encoder.0.body.0.rdb1.conv1.weight"])[0]
    num_rrdbs = _count(sd, r"FCN\.encoder\.0\.body\.\d+\.rdb1\.conv1\.weight")
    n_fused = _count(sd, r"FCN\.fusion_out\.\d+\.weight")
    in_size, out_size = 2 ** (n_fused + 1), g_config["size"]
    channels = {}
    for j in range(n_fused):
      channels[4 * 2 ** j] = np.shape(sd[f"FCN.fusion_out.{j}.weight"])[0]
    for i in range(int(math.log2(out_size / in_size))):
      w = sd[f"FCN.decoder.{i}.upsample_conv.weight"]
      channels[in_size * 2 ** (i + 1)] = np.shape(w)[0] // 4
  except KeyError as e:
    raise ConversionError(
        f"{src}: not the deghosting network's state dict (no key "
        f"{e.args[0]!r}); {_RELEASED}.") from None
  if len(first) != 4 or first[1] != 3 or n_fused < 1 or in_size > out_size:
    raise ConversionError(
        f"{src}: FCN.encoder.0.conv_first.weight {first} and {n_fused} "
        f"fusion layers describe no deghosting network of a {out_size}² "
        f"generator; {_RELEASED}.")
  return dg.make_config(in_size, out_size, channels, first[0], growth,
                        num_rrdbs, g_config)


def expected_shapes(config):
  """{released key: shape} of every entry of a network of `config`."""
  from dhr_jax.models import deghosting as dg
  shapes = {}
  for kp, leaf in jax.tree_util.tree_flatten_with_path(
      dg.param_shapes(config))[0]:
    path = tuple(k.key for k in kp)
    s = tuple(leaf.shape)
    if path[-1] == "kernel":   # HWIO / (in, out) → PyTorch's layouts
      s = (s[3], s[2], s[0], s[1]) if len(s) == 4 else s[::-1]
    shapes[fcn_torch_name(path)] = s
  for k, s in sg2.expected_shapes(config["generator"]).items():
    shapes["generator." + to_mmediting(k)] = s
  return shapes


def convert_state_dict(state_dict, src="<state_dict>"):
  """Released state dict (numpy values) → (tree, config) for
  `dhr_jax.models.deghosting.Deghoster`."""
  from dhr_jax.models import deghosting as dg
  sd = state_dict
  if not any(k.startswith("FCN.") for k in sd) or not any(
      k.startswith("generator.") for k in sd):
    raise ConversionError(
        f"{src}: not the deghosting network's state dict (no 'FCN.*' and "
        f"'generator.*' keys such as FCN.encoder.0.conv_first.weight); "
        f"{_RELEASED}.")
  config = infer_config(sd, src)
  check_keys(src, sd, expected_shapes(config))
  fcn = {}
  for kp, _ in jax.tree_util.tree_flatten_with_path(
      dg.param_shapes(config))[0]:
    path = tuple(k.key for k in kp)
    value = sd[fcn_torch_name(path)]
    if path[-1] == "kernel":
      value = conv_to_hwio(value) if value.ndim == 4 else f32(value.T)
    node = fcn
    for p in path[:-1]:
      node = node.setdefault(p, {})
    node[path[-1]] = f32(value)
  gen = {to_rosinality(k[len("generator."):]): v for k, v in sd.items()
         if k.startswith("generator.")}
  g_tree, g_config = sg2.convert_generator(
      gen, src, config_update={"pixel_norm": "mmediting"})
  assert g_config == config["generator"]
  tree = {"fcn": fcn, "generator": g_tree["params"], "noise": g_tree["noise"]}
  return tree, config


def convert(src, dst, overwrite=False):
  """Converts the file at `src` into the checkpoint directory `dst`;
  everything is checked before anything is written."""
  from dhr_jax import checkpoint
  from dhr_jax.models import deghosting as dg
  tree, config = convert_state_dict(
      read_plain_state_dict(src, _RELEASED), src)
  return checkpoint.save(dst, tree, dg.KIND, config, overwrite=overwrite)


def main(argv=None):
  return cli_main(
      "Convert the deghosting network of differential-activation editing.",
      lambda args: convert(args.src, args.dst, args.overwrite), argv)


if __name__ == "__main__":
  sys.exit(main())
