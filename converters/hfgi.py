"""Converts HFGI's released checkpoint (Tengfei-Wang/HFGI `ckpt.pt`) for dhr_jax.

    python -m converters.hfgi --src ckpt.pt --dst DIR

Accepted layouts: the released one, `torch.save({'state_dict': {'encoder.*',
'decoder.*', 'residue.*', 'grid_align.*'}, 'latent_avg', 'opts'})`, and the
same weights as GANInverter saves them: {'encoder': {'encoder.*',
'latent_avg'}, 'decoder': {...}, 'align': {...}, 'res': {...}, ...}. One
command writes a bundle:

    DIR/e4e/        the e4e encoder HFGI starts from (converters.e4e)
    DIR/generator/  its StyleGAN2 generator
    DIR/hfgi/       the ADA aligner and the consultation encoder

so `load_encoder(DIR)`, `load_generator(DIR)` and `load_hfgi(DIR)` all read
DIR.
"""
import dataclasses
import math
import os
import sys

import numpy as np

from converters.common import (ConversionError, check_keys, cli_main,
                               conv_to_hwio, f32)
from converters.e4e import (bottleneck_shapes, check_destinations,
                            convert_bottleneck, convert_parts, convert_stem,
                            read_bundle, stem_shapes, write_models)
from dhr_jax.models import hfgi

PARTS = ("encoder", "decoder", "grid_align", "residue")
_STEM = {"grid_align": (6, hfgi.ALIGN_STEM), "residue": (3, hfgi.RESIDUE_STEM)}
# The released checkpoint is the official architecture.
_RESIDUE_DOWN = hfgi.OFFICIAL.residue_down


def expected_shapes(net):
  """{official key: shape} of 'grid_align' (ResidualAligner) or 'residue'
  (ResidualEncoder), BatchNorm counters excluded."""
  shapes = stem_shapes("conv_layer1", *_STEM[net])
  for prefix, c_in, depth, _ in hfgi.unit_specs(net, _RESIDUE_DOWN):
    shapes.update(bottleneck_shapes(prefix, c_in, depth, se=False))
  if net == "residue":
    c = hfgi.OFFICIAL.condition_channels
    for head in hfgi.HEADS:
      # Sequential(EqualConv2d, ScaledLeakyReLU, EqualConv2d): entries 0, 2.
      for i, c_in in ((0, _RESIDUE_DOWN[-1][1]), (2, c)):
        shapes[f"{head}.{i}.weight"] = (c, c_in, 3, 3)
        shapes[f"{head}.{i}.bias"] = (c,)
  return shapes


def _equal_conv(sd, prefix):
  # EqualConv2d multiplies its weight by 1/sqrt(fan_in) at run time; the
  # Flax conv gets the product (in float32, as torch forms it).
  w = np.asarray(sd[f"{prefix}.weight"], np.float32)
  scale = np.float32(1.0 / math.sqrt(np.prod(w.shape[1:])))
  return {"kernel": conv_to_hwio(w * scale), "bias": f32(sd[f"{prefix}.bias"])}


def convert_network(sd, net, src="<state_dict>"):
  """One network's state dict (prefix stripped) → its Flax params.

  Refuses, naming the keys, on any missing, unexpected or mis-shaped entry.
  """
  ignore = [k for k in sd if k.endswith("num_batches_tracked")]
  check_keys(src, sd, expected_shapes(net), ignore=ignore)
  params = convert_stem(sd, "conv_layer1")
  for prefix, c_in, depth, _ in hfgi.unit_specs(net, _RESIDUE_DOWN):
    params[hfgi.module_name(prefix)] = convert_bottleneck(
        sd, prefix, c_in, depth, se=False)
  if net == "residue":
    for head in hfgi.HEADS:
      params[head] = {"conv_0": _equal_conv(sd, f"{head}.0"),
                      "conv_1": _equal_conv(sd, f"{head}.2")}
  return params


def _check_generator(src, g_config, config):
  res = config.condition_size
  channels = g_config["channels"].get(str(res))
  if channels != config.condition_channels:
    raise ConversionError(
        f"{src}: HFGI modulates the generator's {res}² feature with "
        f"{config.condition_channels}-channel conditions, but the decoder "
        f"({g_config['size']}²) has {channels} channels there.")


def convert(src, dst, overwrite=False):
  """Converts the HFGI checkpoint at `src` into DIR=`dst` (DIR/e4e,
  DIR/generator, DIR/hfgi); everything is checked before anything is
  written."""
  src = os.fspath(src)
  check_destinations(dst, ("e4e", "generator", hfgi.KIND), overwrite)
  parts, latent_avg, opts = read_bundle(src, PARTS)
  models = convert_parts(src, parts, latent_avg, opts)
  config = hfgi.OFFICIAL
  _check_generator(src, models["generator"][1], config)
  params = {
      "align": convert_network(parts["grid_align"], "grid_align",
                               src + " (grid_align.*)"),
      "residue": convert_network(parts["residue"], "residue",
                                 src + " (residue.*)"),
  }
  models[hfgi.KIND] = (params, dataclasses.asdict(config))
  return write_models(dst, models, overwrite)


def main(argv=None):
  return cli_main(
      "Convert HFGI's checkpoint (e4e encoder, generator, aligner, "
      "consultation encoder).",
      lambda args: convert(args.src, args.dst, args.overwrite), argv)


if __name__ == "__main__":
  sys.exit(main())
