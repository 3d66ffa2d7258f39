"""Converts CurricularFace's IR-101 (CurricularFace_Backbone.pth) for dhr_jax.

    python -m converters.curricularface --src CurricularFace_Backbone.pth --dst DIR

The file is a plain state dict of `IR_101(input_size=112)` (GANInverter's
`calc_id_loss.py` loads it with `load_state_dict`): `input_layer.*`,
`body.<i>.*` (49 bottleneck_IR units), `output_layer.0.*` (BatchNorm2d),
`output_layer.3.*` (Linear) and `output_layer.4.*` (BatchNorm1d without
affine parameters). DIR holds one checkpoint of kind 'curricularface', read
by `dhr_jax.load_id_network(DIR)`.
"""
import sys

from converters.common import (ConversionError, check_keys, cli_main, f32,
                               read_plain_state_dict)
from converters.e4e import (bn_shapes, bottleneck_shapes, convert_bn,
                            convert_bottleneck, convert_stem, stem_shapes)

EMBEDDING_DIM = 512


def expected_shapes():
  """{official key: shape} of IR_101(input_size=112), counters excluded."""
  from dhr_jax.models import curricularface as cf
  from dhr_jax.models import irse
  shapes = stem_shapes("input_layer", 3, 64)
  for i, (c_in, depth, _) in enumerate(irse.unit_specs(cf.NUM_LAYERS)):
    shapes.update(bottleneck_shapes(f"body.{i}", c_in, depth, se=False))
  shapes.update(bn_shapes("output_layer.0", 512))
  shapes["output_layer.3.weight"] = (EMBEDDING_DIM,
                                     512 * cf.OUTPUT_SPATIAL ** 2)
  shapes["output_layer.3.bias"] = (EMBEDDING_DIM,)
  shapes["output_layer.4.running_mean"] = (EMBEDDING_DIM,)
  shapes["output_layer.4.running_var"] = (EMBEDDING_DIM,)
  return shapes


def convert_state_dict(state_dict, src="<state_dict>"):
  """Official state dict (numpy values) → (tree, config) for
  `dhr_jax.models.curricularface.IDNetwork`. Raises ConversionError naming
  every missing, unexpected or mis-shaped key."""
  from dhr_jax.models import curricularface as cf
  from dhr_jax.models import irse
  expected = expected_shapes()
  if not set(expected) & set(state_dict):
    raise ConversionError(
        f"{src}: not IR_101's state dict (none of its keys such as "
        "input_layer.0.weight or output_layer.3.weight); pass "
        "CurricularFace_Backbone.pth as released.")
  ignore = [k for k in state_dict if k.endswith("num_batches_tracked")]
  check_keys(src, state_dict, expected, ignore=ignore)
  sd = state_dict
  params = convert_stem(sd, "input_layer")
  for i, (c_in, depth, _) in enumerate(irse.unit_specs(cf.NUM_LAYERS)):
    params[f"body_{i}"] = convert_bottleneck(sd, f"body.{i}", c_in, depth,
                                             se=False)
  params["output_bn"] = convert_bn(sd, "output_layer.0")
  params["output_linear"] = {"kernel": f32(sd["output_layer.3.weight"].T),
                             "bias": f32(sd["output_layer.3.bias"])}
  params["output_bn1d"] = {"mean": f32(sd["output_layer.4.running_mean"]),
                           "var": f32(sd["output_layer.4.running_var"])}
  return {"params": params}, cf.make_config()


def convert(src, dst, overwrite=False):
  """Converts the file at `src` into the checkpoint directory `dst`;
  everything is checked before anything is written."""
  from dhr_jax import checkpoint
  from dhr_jax.models import curricularface as cf
  tree, config = convert_state_dict(
      read_plain_state_dict(src, "pass CurricularFace_Backbone.pth as "
                            "released"), src)
  return checkpoint.save(dst, tree, cf.KIND, config, overwrite=overwrite)


def main(argv=None):
  return cli_main(
      "Convert CurricularFace's IR-101 (the paper's identity network).",
      lambda args: convert(args.src, args.dst, args.overwrite), argv)


if __name__ == "__main__":
  sys.exit(main())
