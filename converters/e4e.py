"""Converts the released e4e checkpoint (e4e_ffhq_encode.pt) for dhr_jax.

    python -m converters.e4e --src e4e_ffhq_encode.pt --dst DIR

The file is `torch.save({'state_dict': {'encoder.*', 'decoder.*'},
'latent_avg': (18, 512), 'opts': {...}})`, or the same weights as
GANInverter saves them (its e4e and LSAP releases): {'encoder':
{'encoder.*', 'latent_avg'}, 'decoder': {...}, 'opts', ...}. One command
writes a bundle:

    DIR/e4e/        the encoder (kind 'e4e') and latent_avg
    DIR/generator/  the StyleGAN2 decoder e4e was trained with (kind 'generator')

so `load_encoder(DIR)` and `load_generator(DIR)` both work on DIR. It is
`converters.encoder` expecting e4e (that one also converts pSp and ReStyle);
this module keeps the IR-SE building blocks and the bundle reader they share.
"""
import argparse
import os
import sys

from converters.common import (ConversionError, cli_main, conv_to_hwio, f32,
                               to_numpy, torch_load)
_BN = {"weight": "scale", "bias": "bias", "running_mean": "mean",
       "running_var": "var"}


def bn_shapes(prefix, c):
  """{key: shape} of an official BatchNorm2d(c) (counters excluded)."""
  return {f"{prefix}.{k}": (c,) for k in _BN}


def stem_shapes(prefix, c_in, c_out):
  """{key: shape} of Sequential(Conv2d 3×3 no bias, BatchNorm2d, PReLU)."""
  return {f"{prefix}.0.weight": (c_out, c_in, 3, 3),
          **bn_shapes(f"{prefix}.1", c_out), f"{prefix}.2.weight": (c_out,)}


def bottleneck_shapes(prefix, c_in, depth, se=True):
  """{key: shape} of bottleneck_IR_SE (se=False: bottleneck_IR)."""
  shapes = {}
  if c_in != depth:
    shapes[f"{prefix}.shortcut_layer.0.weight"] = (depth, c_in, 1, 1)
    shapes.update(bn_shapes(f"{prefix}.shortcut_layer.1", depth))
  p = f"{prefix}.res_layer"
  shapes.update(bn_shapes(f"{p}.0", c_in))
  shapes[f"{p}.1.weight"] = (depth, c_in, 3, 3)
  shapes[f"{p}.2.weight"] = (depth,)
  shapes[f"{p}.3.weight"] = (depth, depth, 3, 3)
  shapes.update(bn_shapes(f"{p}.4", depth))
  if se:
    shapes[f"{p}.5.fc1.weight"] = (depth // 16, depth, 1, 1)
    shapes[f"{p}.5.fc2.weight"] = (depth, depth // 16, 1, 1)
  return shapes


def expected_shapes(n_styles):
  """{official encoder key: shape} of Encoder4Editing(50, 'ir_se')."""
  from converters import encoder
  return encoder.expected_shapes("e4e", n_styles)


def convert_bn(sd, prefix):
  """Official BatchNorm2d entries → FrozenBatchNorm params."""
  return {ours: f32(sd[f"{prefix}.{theirs}"]) for theirs, ours in _BN.items()}


def convert_stem(sd, prefix):
  """Sequential(Conv2d, BatchNorm2d, PReLU) → input_conv/_bn/_prelu params."""
  return {"input_conv": {"kernel": conv_to_hwio(sd[f"{prefix}.0.weight"])},
          "input_bn": convert_bn(sd, f"{prefix}.1"),
          "input_prelu": {"alpha": f32(sd[f"{prefix}.2.weight"])}}


def convert_bottleneck(sd, prefix, c_in, depth, se=True):
  """bottleneck_IR(_SE) entries under `prefix` → BottleneckIRSE params."""
  p = f"{prefix}.res_layer"
  unit = {
      "bn1": convert_bn(sd, f"{p}.0"),
      "conv1": {"kernel": conv_to_hwio(sd[f"{p}.1.weight"])},
      "prelu": {"alpha": f32(sd[f"{p}.2.weight"])},
      "conv2": {"kernel": conv_to_hwio(sd[f"{p}.3.weight"])},
      "bn2": convert_bn(sd, f"{p}.4"),
  }
  if se:
    unit["se"] = {
        "fc1": {"kernel": f32(sd[f"{p}.5.fc1.weight"][:, :, 0, 0].T)},
        "fc2": {"kernel": f32(sd[f"{p}.5.fc2.weight"][:, :, 0, 0].T)},
    }
  if c_in != depth:
    unit["shortcut_conv"] = {
        "kernel": conv_to_hwio(sd[f"{prefix}.shortcut_layer.0.weight"])}
    unit["shortcut_bn"] = convert_bn(sd, f"{prefix}.shortcut_layer.1")
  return unit


def convert_encoder(state_dict, src="<state_dict>"):
  """Official e4e state dict (no 'encoder.' prefix) → (tree, config) of
  `dhr_jax.models.e4e.Encoder4Editing` (see `converters.encoder`)."""
  from converters import encoder
  return encoder.convert_encoder(state_dict, "e4e", src)


def _load_bundle(src):
  """torch_load, also accepting opts stored as an argparse.Namespace.

  weights_only=True refuses arbitrary classes. The released files keep opts
  as a plain dict (fine), but some training forks save the Namespace itself;
  allow-listing exactly that class keeps the load safe (it only sets
  attributes) while accepting those files.
  """
  try:
    import torch
    safe = torch.serialization.safe_globals([argparse.Namespace])
  except (ImportError, AttributeError):
    return torch_load(src)
  with safe:
    return torch_load(src)


# GANInverter (caopulan/GANInverter, the DHR authors' framework) saves one
# dict per network instead of one prefixed state_dict; its names for the
# released prefixes:
GANINVERTER_PARTS = {"encoder": "encoder", "decoder": "decoder",
                     "grid_align": "align", "residue": "res"}
_CONVERTER = {"residue": "converters.hfgi", "grid_align": "converters.hfgi"}


def _prefixes(parts):
  names = [f"{p}.*" for p in parts]
  return ", ".join(names[:-1]) + " and " + names[-1]


def _foreign_hint(names):
  """Points to the converter of foreign weights, when there is one."""
  tools = sorted({_CONVERTER[n.split(".")[0]] for n in names
                  if n.split(".")[0] in _CONVERTER})
  return (f" They belong to another model; convert the file with "
          f"`python -m {tools[0]}`." if tools else "")


def _missing_part(src, where, label, part):
  msg = f"{src}: {where} has no {label} entries"
  if part == "decoder":
    msg += "; the bundle must hold the generator the encoder was trained with"
  return ConversionError(msg + ".")


def _read_released(src, ckpt, parts):
  sd = ckpt["state_dict"]
  if not isinstance(sd, dict):
    raise ConversionError(f"{src}: 'state_dict' is not a dict of tensors.")
  other = sorted(k for k in sd if k.split(".")[0] not in parts)
  if other:
    raise ConversionError(
        f"{src}: state_dict has entries outside {_prefixes(parts)}: "
        f"{', '.join(other[:20])}{' ...' if len(other) > 20 else ''}."
        + _foreign_hint(other))
  out = {}
  for part in parts:
    out[part] = to_numpy(sd, part + ".")
    if not out[part]:
      raise _missing_part(src, "state_dict", f"{part}.*", part)
  return out, ckpt.get("latent_avg"), ckpt.get("opts")


def _read_ganinverter(src, ckpt, parts):
  enc = ckpt["encoder"]
  other = sorted(k for k in enc
                 if k != "latent_avg" and not k.startswith("encoder."))
  if other:
    raise ConversionError(
        f"{src}: ['encoder'] has entries other than encoder.* and "
        f"latent_avg: {', '.join(other[:20])}")
  encoder = to_numpy(enc, "encoder.")
  if encoder and all(k.startswith("module.") for k in encoder):
    # Saved from a DistributedDataParallel-wrapped encoder.
    encoder = {k[len("module."):]: v for k, v in encoder.items()}
  out = {"encoder": encoder}
  foreign = sorted(name for part, name in GANINVERTER_PARTS.items()
                   if part not in parts and name in ckpt)
  if foreign:
    raise ConversionError(
        f"{src}: holds networks this converter does not convert: "
        f"{', '.join(repr(n) for n in foreign)}." + _foreign_hint(["residue"]))
  for part in parts:
    name = GANINVERTER_PARTS[part]
    if part != "encoder":
      out[part] = (to_numpy(ckpt[name]) if isinstance(ckpt.get(name), dict)
                   else {})
    if not out[part]:
      raise _missing_part(src, "the GANInverter checkpoint",
                          f"[{name!r}]" + (" encoder.*" if part == "encoder"
                                          else ""), part)
  return out, enc.get("latent_avg"), ckpt.get("opts")


def read_bundle(src, parts=("encoder", "decoder"), what="an e4e"):
  """Reads an encoder bundle in the released layout or GANInverter's.

  Released (e4e, pSp, HFGI): {'state_dict': {'<part>.<key>': tensor},
  'latent_avg', 'opts'}. GANInverter: {'encoder': {'encoder.<key>': ...,
  'latent_avg': ...}, 'decoder': {...}, 'align': {...}, 'res': {...},
  'opts', training state (ignored)}. Every part must be there; weights of
  other networks are refused (never silently dropped).

  Returns ({part: {key: numpy}}, latent_avg or None, opts or None).
  """
  ckpt = _load_bundle(src)
  if isinstance(ckpt, dict) and "state_dict" in ckpt:
    return _read_released(src, ckpt, parts)
  if isinstance(ckpt, dict) and isinstance(ckpt.get("encoder"), dict):
    return _read_ganinverter(src, ckpt, parts)
  hint = ""
  if isinstance(ckpt, dict) and "g_ema" in ckpt:
    hint = (" It looks like a StyleGAN2 generator checkpoint; convert it "
            "with `python -m converters.stylegan2`.")
  keys = sorted(ckpt) if isinstance(ckpt, dict) else type(ckpt).__name__
  raise ConversionError(
      f"{src}: not {what} checkpoint (expected a dict with 'state_dict', "
      f"'latent_avg' and 'opts', or GANInverter's 'encoder' and 'decoder'; "
      f"got {keys}).{hint}")


def check_destinations(dst, kinds, overwrite):
  """Refuses before reading anything if a model's sub-directory is taken."""
  from dhr_jax import checkpoint
  for kind in kinds:
    d = os.path.join(dst, kind)
    if os.path.exists(d) and os.listdir(d) and not overwrite:
      raise checkpoint.CheckpointError(
          f"{d} already exists and is not empty; choose another --dst or pass "
          "--overwrite.")


def convert_parts(src, parts, latent_avg, opts):
  """The e4e encoder and its generator from `read_bundle`'s output, all
  checked → {kind: (tree, config)} for `write_models`; any other encoder
  (opts['encoder_type']) is refused naming both."""
  from converters import encoder
  models, _, _ = encoder.convert_parts(src, parts, latent_avg, opts,
                                       expect="e4e")
  return models


def write_models(dst, models, overwrite=False):
  """Writes {kind: (tree, config)} as DIR/<kind>/ checkpoints of that kind."""
  from dhr_jax import checkpoint
  os.makedirs(dst, exist_ok=True)
  for kind, (tree, config) in models.items():
    checkpoint.save(os.path.join(dst, kind), tree, kind, config,
                    overwrite=overwrite)
  return dst


def convert(src, dst, overwrite=False):
  """Converts the e4e bundle at `src` into DIR=`dst` (DIR/e4e,
  DIR/generator): `converters.encoder` expecting e4e."""
  from converters import encoder
  return encoder.convert(src, dst, overwrite, expect="e4e",
                         report=lambda line: None)


def main(argv=None):
  return cli_main(
      "Convert the released e4e checkpoint (encoder + its StyleGAN2 decoder).",
      lambda args: convert(args.src, args.dst, args.overwrite), argv)


if __name__ == "__main__":
  sys.exit(main())
