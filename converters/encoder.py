"""Converts an encoder bundle — e4e, pSp or ReStyle — for dhr_jax.

    python -m converters.encoder --src BUNDLE.pt --dst DIR [--arch restyle]

Reads the released layout (`{'state_dict': {'encoder.*', 'decoder.*'},
'latent_avg', 'opts'}`: e4e_ffhq_encode.pt, psp_ffhq_encode.pt,
restyle_e4e_ffhq_encode.pt) and GANInverter's own (`{'encoder':
{'encoder.*', 'latent_avg'}, 'decoder': {...}, 'opts'}`). The architecture
comes from `opts['encoder_type']`:

    Encoder4Editing             e4e      → DIR/e4e/
    GradualStyleEncoder         pSp      → DIR/psp/
    ProgressiveBackboneEncoder  ReStyle  → DIR/restyle/

and without opts from the weight names (e4e and pSp share every name, so
such a file needs `--arch`). Any other encoder_type is refused by name. The
decoder is written to DIR/generator/, so `dhr_jax.load_encoder(DIR)` and
`dhr_jax.load_generator(DIR)` both read DIR. `--arch` states what you expect;
a file holding another encoder is refused naming both.
"""
import argparse
import math
import os
import sys

import numpy as np

from converters.common import (ConversionError, check_keys, cli_main,
                               conv_to_hwio, f32, to_numpy)
from converters.e4e import (bottleneck_shapes, check_destinations,
                            convert_bottleneck, convert_stem, read_bundle,
                            stem_shapes, write_models)

STYLE_DIM = 512

# opts['encoder_type'] → the architecture (= checkpoint kind) we build.
ENCODER_TYPES = {"Encoder4Editing": "e4e", "GradualStyleEncoder": "psp",
                 "ProgressiveBackboneEncoder": "restyle"}
TYPE_OF = {arch: t for t, arch in ENCODER_TYPES.items()}


def describe(arch):
  """'pSp (GradualStyleEncoder)' — the names users see in messages."""
  from dhr_jax.models import encoders
  return encoders.TITLES[arch]


def style_block_convs(arch, i):
  from dhr_jax.models import e4e
  # ProgressiveBackboneEncoder reads every style from the 16² map, as
  # e4e's style 0 does.
  return e4e.style_block_convs(0 if arch == "restyle" else i)


def has_laterals(arch):
  """e4e and pSp have the FPN laterals; ReStyle's backbone has none."""
  return arch != "restyle"


def expected_shapes(arch, n_styles, input_nc=None):
  """{official encoder key: shape} of the (50, 'ir_se') encoder `arch`."""
  from dhr_jax.models import e4e, irse
  if input_nc is None:
    input_nc = 6 if arch == "restyle" else 3
  shapes = stem_shapes("input_layer", input_nc, 64)
  for i, (c_in, depth, _) in enumerate(irse.unit_specs(e4e.NUM_LAYERS)):
    shapes.update(bottleneck_shapes(f"body.{i}", c_in, depth))
  for i in range(n_styles):
    for j in range(style_block_convs(arch, i)):
      shapes[f"styles.{i}.convs.{2 * j}.weight"] = (STYLE_DIM, STYLE_DIM, 3, 3)
      shapes[f"styles.{i}.convs.{2 * j}.bias"] = (STYLE_DIM,)
    shapes[f"styles.{i}.linear.weight"] = (STYLE_DIM, STYLE_DIM)
    shapes[f"styles.{i}.linear.bias"] = (STYLE_DIM,)
  if has_laterals(arch):
    shapes["latlayer1.weight"] = (STYLE_DIM, 256, 1, 1)
    shapes["latlayer1.bias"] = (STYLE_DIM,)
    shapes["latlayer2.weight"] = (STYLE_DIM, 128, 1, 1)
    shapes["latlayer2.bias"] = (STYLE_DIM,)
  return shapes


def infer_styles(src, sd):
  """(number of style blocks, generator size) from the encoder's keys."""
  idx = set()
  for k in sd:
    parts = k.split(".")
    if parts[0] == "styles" and len(parts) > 1 and parts[1].isdigit():
      idx.add(int(parts[1]))
  n = len(idx)
  if n == 0 or idx != set(range(n)):
    raise ConversionError(
        f"{src}: cannot find the style blocks styles.0 ... styles.N-1 in the "
        f"encoder (found indices {sorted(idx)}); is this an e4e, pSp or "
        "ReStyle checkpoint?")
  size = 2 ** ((n + 2) // 2)
  if n % 2 or n < 6:
    raise ConversionError(
        f"{src}: {n} style blocks do not match any StyleGAN2 size "
        "(expected 2*log2(size)-2, e.g. 18 for 1024²).")
  return n, size


def input_channels(sd):
  w = sd.get("input_layer.0.weight")
  return None if w is None or np.ndim(w) != 4 else int(np.shape(w)[1])


def convert_encoder(state_dict, arch, src="<state_dict>"):
  """Official encoder state dict (no 'encoder.' prefix) → (tree, config).

  tree is the Flax parameter tree of the module `arch` builds
  (`dhr_jax.models.e4e.build_model`). Raises ConversionError naming every
  missing, unexpected or mis-shaped key (BatchNorm counters are ignored).
  """
  from dhr_jax.models import e4e, irse
  n_styles, size = infer_styles(src, state_dict)
  input_nc = input_channels(state_dict)
  ignore = [k for k in state_dict if k.endswith("num_batches_tracked")]
  check_keys(src, state_dict, expected_shapes(arch, n_styles, input_nc),
             ignore=ignore)
  sd = state_dict
  params = convert_stem(sd, "input_layer")
  for i, (c_in, depth, _) in enumerate(irse.unit_specs(e4e.NUM_LAYERS)):
    params[f"body_{i}"] = convert_bottleneck(sd, f"body.{i}", c_in, depth)
  for i in range(n_styles):
    p = f"styles.{i}"
    block = {}
    for j in range(style_block_convs(arch, i)):
      block[f"conv_{j}"] = {
          "kernel": conv_to_hwio(sd[f"{p}.convs.{2 * j}.weight"]),
          "bias": f32(sd[f"{p}.convs.{2 * j}.bias"])}
    # EqualLinear(lr_mul=1) multiplies its weight by 1/sqrt(fan_in) at run
    # time; a Flax Dense wants the effective weight, transposed.
    w = sd[f"{p}.linear.weight"].astype(np.float32)
    scale = np.float32(1.0 / math.sqrt(w.shape[1]))
    block["linear"] = {"kernel": f32((w * scale).T),
                       "bias": f32(sd[f"{p}.linear.bias"])}
    params[f"styles_{i}"] = block
  if has_laterals(arch):
    for name in ("latlayer1", "latlayer2"):
      params[name] = {"kernel": conv_to_hwio(sd[f"{name}.weight"]),
                      "bias": f32(sd[f"{name}.bias"])}
  from dhr_jax.models import encoders
  config = encoders.make_config(arch, size)
  if arch != "e4e":  # e4e checkpoints keep their original config
    config["input_nc"] = input_nc
  return params, config


def latent_avg_array(src, latent_avg, n_latent):
  """The bundle's latent_avg as (n_latent, 512); (512,) rows are repeated."""
  if latent_avg is None:
    raise ConversionError(
        f"{src}: no 'latent_avg' entry. The released encoder bundles store "
        "the average latent the codes are offsets from; this file is not one.")
  avg = to_numpy({"a": latent_avg})["a"].astype(np.float32)
  if avg.shape in ((STYLE_DIM,), (1, STYLE_DIM)):
    avg = np.tile(avg.reshape(1, STYLE_DIM), (n_latent, 1))
  if avg.shape != (n_latent, STYLE_DIM):
    raise ConversionError(
        f"{src}: latent_avg has shape {avg.shape}, expected ({n_latent}, "
        f"{STYLE_DIM}) or ({STYLE_DIM},) for {n_latent} styles.")
  return np.ascontiguousarray(avg)


def generator_latent_avg(avg):
  # The generator keeps one (style_dim,) mean latent. The encoders store it
  # repeated per style; rows that differ have no single-vector equivalent.
  return avg[0] if np.all(avg == avg[:1]) else None


def _opts_dict(opts):
  if isinstance(opts, argparse.Namespace):
    return vars(opts)
  return opts if isinstance(opts, dict) else {}


def detect_arch(src, encoder_sd, opts, expect=None):
  """(arch, how it was found) of a bundle's encoder; refuses types dhr_jax
  does not build and, with `expect`, any other architecture."""
  enc = _opts_dict(opts).get("encoder_type")
  if enc is not None:
    if enc not in ENCODER_TYPES:
      raise ConversionError(
          f"{src}: opts['encoder_type'] is {enc!r}, which dhr_jax does not "
          f"build (it converts {', '.join(ENCODER_TYPES)}).")
    arch, how = ENCODER_TYPES[enc], f"opts['encoder_type'] = {enc!r}"
  elif "latlayer1.weight" in encoder_sd:
    if expect is None:
      raise ConversionError(
          f"{src}: no opts['encoder_type'], and e4e and pSp share every "
          "weight name; pass --arch e4e or --arch psp.")
    arch, how = expect, "--arch (e4e and pSp share the weight names)"
  else:
    arch, how = "restyle", "the weight names (no FPN laterals)"
  if expect is not None and arch != expect:
    raise ConversionError(
        f"{src}: holds {'an' if arch == 'e4e' else 'a'} {describe(arch)} "
        f"encoder (from {how}), expected "
        f"{describe(expect)}.")
  return arch, how


def check_opts(src, opts, arch, size, input_nc):
  """The bundle's options, when present, must agree with its weights."""
  opts = _opts_dict(opts)
  # e4e says stylegan_size, pSp/ReStyle output_size, GANInverter resolution.
  for key in ("stylegan_size", "output_size", "resolution"):
    got = opts.get(key)
    if got is not None and int(got) != size:
      raise ConversionError(
          f"{src}: opts[{key!r}] is {got} but the encoder has the style "
          f"blocks of a {size}² generator; the file is inconsistent.")
  got = opts.get("input_nc")
  if got is not None and input_nc is not None and int(got) != input_nc:
    raise ConversionError(
        f"{src}: opts['input_nc'] is {got} but the {describe(arch)} encoder's "
        f"first convolution takes {input_nc} channels; the file is "
        "inconsistent.")


def convert_parts(src, parts, latent_avg, opts, expect=None):
  """The encoder and its generator from `read_bundle`'s output, all checked
  → ({kind: (tree, config)} for `write_models`, arch, how it was found)."""
  from converters import stylegan2
  where = src + " (encoder.*)"
  arch, how = detect_arch(src, parts["encoder"], opts, expect)
  n_styles, size = infer_styles(where, parts["encoder"])
  check_opts(src, opts, arch, size, input_channels(parts["encoder"]))
  avg = latent_avg_array(src, latent_avg, n_styles)
  params, config = convert_encoder(parts["encoder"], arch, where)
  g_tree, g_config = stylegan2.convert_generator(
      parts["decoder"], src + " (decoder.*)",
      latent_avg=generator_latent_avg(avg))
  if (g_config["size"], g_config["n_latent"]) != (size, n_styles):
    raise ConversionError(
        f"{src}: the decoder is a {g_config['size']}² generator with "
        f"{g_config['n_latent']} styles but the encoder predicts "
        f"{n_styles} styles ({size}²).")
  models = {arch: ({"params": params, "latent_avg": avg}, config),
            "generator": (g_tree, g_config)}
  return models, arch, how


def convert(src, dst, overwrite=False, expect=None, report=print):
  """Converts the bundle at `src` into DIR=`dst` (DIR/<arch>, DIR/generator).

  Everything is checked (destinations, layout, options, latent_avg, both
  state dicts) before anything is written.
  """
  src = os.fspath(src)
  check_destinations(dst, ((expect,) if expect else ()) + ("generator",),
                     overwrite)
  what = {"e4e": "an e4e", "psp": "a pSp", "restyle": "a ReStyle"}
  parts, latent_avg, opts = read_bundle(src, what=what.get(expect,
                                                           "an encoder"))
  models, arch, how = convert_parts(src, parts, latent_avg, opts, expect)
  if not expect:
    check_destinations(dst, (arch,), overwrite)
  report(f"{src}: found a {describe(arch)} encoder (from {how}) for a "
         f"{models[arch][1]['size']}² generator")
  return write_models(dst, models, overwrite)


def main(argv=None):
  def extra(parser):
    parser.add_argument(
        "--arch", choices=sorted(TYPE_OF), default=None,
        help="the encoder you expect (refuses any other; needed for e4e/pSp "
             "files without opts)")
  return cli_main(
      "Convert an e4e, pSp or ReStyle bundle (encoder + its StyleGAN2 "
      "decoder).",
      lambda args: convert(args.src, args.dst, args.overwrite, args.arch),
      argv, extra_args=extra)


if __name__ == "__main__":
  sys.exit(main())
