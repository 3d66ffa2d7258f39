"""Converts the released e4e checkpoint (e4e_ffhq_encode.pt) for dhr_jax.

    python -m converters.e4e --src e4e_ffhq_encode.pt --dst DIR

The file is `torch.save({'state_dict': {'encoder.*', 'decoder.*'},
'latent_avg': (18, 512), 'opts': {...}})`. One command writes a bundle:

    DIR/e4e/        the encoder (kind 'e4e') and latent_avg
    DIR/generator/  the StyleGAN2 decoder e4e was trained with (kind 'stylegan2')

so `load_encoder(DIR)` and `load_generator(DIR)` both work on DIR.
"""
import argparse
import math
import os
import sys

import numpy as np

from converters.common import (ConversionError, check_keys, cli_main,
                               to_numpy, torch_load)

STYLE_DIM = 512
_BN = {"weight": "scale", "bias": "bias", "running_mean": "mean",
       "running_var": "var"}


def expected_shapes(n_styles):
  """{official encoder key: shape} of Encoder4Editing(50, 'ir_se')."""
  from dhr_jax.models import e4e
  shapes = {}

  def bn(prefix, c):
    for k in _BN:
      shapes[f"{prefix}.{k}"] = (c,)

  shapes["input_layer.0.weight"] = (64, 3, 3, 3)
  bn("input_layer.1", 64)
  shapes["input_layer.2.weight"] = (64,)
  for i, (c_in, depth, _) in enumerate(e4e.unit_specs()):
    p = f"body.{i}"
    if c_in != depth:
      shapes[f"{p}.shortcut_layer.0.weight"] = (depth, c_in, 1, 1)
      bn(f"{p}.shortcut_layer.1", depth)
    bn(f"{p}.res_layer.0", c_in)
    shapes[f"{p}.res_layer.1.weight"] = (depth, c_in, 3, 3)
    shapes[f"{p}.res_layer.2.weight"] = (depth,)
    shapes[f"{p}.res_layer.3.weight"] = (depth, depth, 3, 3)
    bn(f"{p}.res_layer.4", depth)
    shapes[f"{p}.res_layer.5.fc1.weight"] = (depth // 16, depth, 1, 1)
    shapes[f"{p}.res_layer.5.fc2.weight"] = (depth, depth // 16, 1, 1)
  for i in range(n_styles):
    for j in range(e4e.style_block_convs(i)):
      shapes[f"styles.{i}.convs.{2 * j}.weight"] = (STYLE_DIM, STYLE_DIM, 3, 3)
      shapes[f"styles.{i}.convs.{2 * j}.bias"] = (STYLE_DIM,)
    shapes[f"styles.{i}.linear.weight"] = (STYLE_DIM, STYLE_DIM)
    shapes[f"styles.{i}.linear.bias"] = (STYLE_DIM,)
  shapes["latlayer1.weight"] = (STYLE_DIM, 256, 1, 1)
  shapes["latlayer1.bias"] = (STYLE_DIM,)
  shapes["latlayer2.weight"] = (STYLE_DIM, 128, 1, 1)
  shapes["latlayer2.bias"] = (STYLE_DIM,)
  return shapes


def _conv(w):
  # PyTorch (out, in, kh, kw) → Flax HWIO.
  return np.ascontiguousarray(np.transpose(w, (2, 3, 1, 0)), np.float32)


def _f32(a):
  return np.ascontiguousarray(a, np.float32)


def _infer_styles(src, sd):
  idx = set()
  for k in sd:
    parts = k.split(".")
    if parts[0] == "styles" and len(parts) > 1 and parts[1].isdigit():
      idx.add(int(parts[1]))
  n = len(idx)
  if n == 0 or idx != set(range(n)):
    raise ConversionError(
        f"{src}: cannot find the style blocks styles.0 ... styles.N-1 in the "
        f"encoder (found indices {sorted(idx)}); is this an e4e checkpoint?")
  size = 2 ** ((n + 2) // 2)
  if n % 2 or n < 6:
    raise ConversionError(
        f"{src}: {n} style blocks do not match any StyleGAN2 size "
        "(expected 2*log2(size)-2, e.g. 18 for 1024²).")
  return n, size


def convert_encoder(state_dict, src="<state_dict>"):
  """Official encoder state dict (no 'encoder.' prefix) → (tree, config).

  tree is the Flax parameter tree of `dhr_jax.models.e4e.Encoder4Editing`.
  Raises ConversionError naming every missing, unexpected or mis-shaped key
  (BatchNorm num_batches_tracked counters are ignored).
  """
  from dhr_jax.models import e4e
  n_styles, size = _infer_styles(src, state_dict)
  ignore = [k for k in state_dict if k.endswith("num_batches_tracked")]
  check_keys(src, state_dict, expected_shapes(n_styles), ignore=ignore)
  sd = state_dict

  def bn(prefix):
    return {ours: _f32(sd[f"{prefix}.{theirs}"]) for theirs, ours in _BN.items()}

  params = {
      "input_conv": {"kernel": _conv(sd["input_layer.0.weight"])},
      "input_bn": bn("input_layer.1"),
      "input_prelu": {"alpha": _f32(sd["input_layer.2.weight"])},
  }
  for i, (c_in, depth, _) in enumerate(e4e.unit_specs()):
    p = f"body.{i}.res_layer"
    unit = {
        "bn1": bn(f"{p}.0"),
        "conv1": {"kernel": _conv(sd[f"{p}.1.weight"])},
        "prelu": {"alpha": _f32(sd[f"{p}.2.weight"])},
        "conv2": {"kernel": _conv(sd[f"{p}.3.weight"])},
        "bn2": bn(f"{p}.4"),
        "se": {
            "fc1": {"kernel": _f32(sd[f"{p}.5.fc1.weight"][:, :, 0, 0].T)},
            "fc2": {"kernel": _f32(sd[f"{p}.5.fc2.weight"][:, :, 0, 0].T)},
        },
    }
    if c_in != depth:
      unit["shortcut_conv"] = {
          "kernel": _conv(sd[f"body.{i}.shortcut_layer.0.weight"])}
      unit["shortcut_bn"] = bn(f"body.{i}.shortcut_layer.1")
    params[f"body_{i}"] = unit
  for i in range(n_styles):
    p = f"styles.{i}"
    block = {}
    for j in range(e4e.style_block_convs(i)):
      block[f"conv_{j}"] = {"kernel": _conv(sd[f"{p}.convs.{2 * j}.weight"]),
                            "bias": _f32(sd[f"{p}.convs.{2 * j}.bias"])}
    # EqualLinear(lr_mul=1) multiplies its weight by 1/sqrt(fan_in) at run
    # time; a Flax Dense wants the effective weight, transposed.
    w = sd[f"{p}.linear.weight"].astype(np.float32)
    scale = np.float32(1.0 / math.sqrt(w.shape[1]))
    block["linear"] = {"kernel": _f32((w * scale).T),
                       "bias": _f32(sd[f"{p}.linear.bias"])}
    params[f"styles_{i}"] = block
  for name in ("latlayer1", "latlayer2"):
    params[name] = {"kernel": _conv(sd[f"{name}.weight"]),
                    "bias": _f32(sd[f"{name}.bias"])}
  return params, e4e.make_config(size)


def _latent_avg(src, ckpt, n_latent):
  if "latent_avg" not in ckpt:
    raise ConversionError(
        f"{src}: no 'latent_avg' entry. The released e4e checkpoints store "
        "the average latent the codes are offsets from; this file is not one.")
  avg = to_numpy({"a": ckpt["latent_avg"]})["a"].astype(np.float32)
  if avg.shape == (STYLE_DIM,):
    avg = np.tile(avg[None], (n_latent, 1))
  if avg.shape != (n_latent, STYLE_DIM):
    raise ConversionError(
        f"{src}: latent_avg has shape {avg.shape}, expected ({n_latent}, "
        f"{STYLE_DIM}) or ({STYLE_DIM},) for {n_latent} styles.")
  return np.ascontiguousarray(avg)


def _check_opts(src, opts, size):
  """The bundle's training options, when present, must describe e4e."""
  if isinstance(opts, argparse.Namespace):
    opts = vars(opts)
  if not isinstance(opts, dict):
    return
  enc = opts.get("encoder_type")
  if enc is not None and enc != "Encoder4Editing":
    raise ConversionError(
        f"{src}: opts['encoder_type'] is {enc!r}; only Encoder4Editing (e4e) "
        "is supported. pSp's GradualStyleEncoder has the same weight names "
        "but computes differently, so it is refused rather than misread.")
  got = opts.get("stylegan_size")
  if got is not None and int(got) != size:
    raise ConversionError(
        f"{src}: opts['stylegan_size'] is {got} but the encoder has the style "
        f"blocks of a {size}² generator; the file is inconsistent.")


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


def _split_bundle(src, ckpt):
  if not isinstance(ckpt, dict) or "state_dict" not in ckpt:
    hint = ""
    if isinstance(ckpt, dict) and "g_ema" in ckpt:
      hint = (" It looks like a StyleGAN2 generator checkpoint; convert it "
              "with `python -m converters.stylegan2`.")
    keys = sorted(ckpt) if isinstance(ckpt, dict) else type(ckpt).__name__
    raise ConversionError(
        f"{src}: not an e4e checkpoint (expected a dict with 'state_dict', "
        f"'latent_avg' and 'opts'; got {keys}).{hint}")
  sd = ckpt["state_dict"]
  if not isinstance(sd, dict):
    raise ConversionError(f"{src}: 'state_dict' is not a dict of tensors.")
  other = sorted(k for k in sd
                 if not (k.startswith("encoder.") or k.startswith("decoder.")))
  if other:
    raise ConversionError(
        f"{src}: state_dict has entries outside encoder.* and decoder.*: "
        f"{', '.join(other[:20])}{' ...' if len(other) > 20 else ''}")
  encoder = to_numpy(sd, "encoder.")
  decoder = to_numpy(sd, "decoder.")
  if not encoder:
    raise ConversionError(f"{src}: state_dict has no encoder.* entries.")
  if not decoder:
    raise ConversionError(
        f"{src}: state_dict has no decoder.* entries; the bundle must hold "
        "the generator the encoder was trained with.")
  return encoder, decoder


def _generator_latent_avg(avg):
  # The generator keeps one (style_dim,) mean latent. e4e stores it repeated
  # per style; rows that differ have no single-vector equivalent.
  return avg[0] if np.all(avg == avg[:1]) else None


def convert(src, dst, overwrite=False):
  """Converts the bundle at `src` into DIR=`dst` (DIR/e4e, DIR/generator).

  Everything is checked (destinations, layout, options, latent_avg, both
  state dicts) before anything is written, so a refusal never leaves half a
  bundle behind.
  """
  from dhr_jax import checkpoint
  from converters import stylegan2
  src = os.fspath(src)
  enc_dir = os.path.join(dst, "e4e")
  gen_dir = os.path.join(dst, "generator")
  for d in (enc_dir, gen_dir):
    if os.path.exists(d) and os.listdir(d) and not overwrite:
      raise checkpoint.CheckpointError(
          f"{d} already exists and is not empty; choose another --dst or pass "
          "--overwrite.")
  ckpt = _load_bundle(src)
  encoder_sd, decoder_sd = _split_bundle(src, ckpt)
  n_styles, size = _infer_styles(src + " (encoder.*)", encoder_sd)
  _check_opts(src, ckpt.get("opts"), size)
  avg = _latent_avg(src, ckpt, n_styles)
  params, config = convert_encoder(encoder_sd, src + " (encoder.*)")
  g_tree, g_config = stylegan2.convert_generator(
      decoder_sd, src + " (decoder.*)", latent_avg=_generator_latent_avg(avg))
  if (g_config["size"], g_config["n_latent"]) != (size, n_styles):
    raise ConversionError(
        f"{src}: the decoder is a {g_config['size']}² generator with "
        f"{g_config['n_latent']} styles but the encoder predicts "
        f"{n_styles} styles ({size}²).")
  os.makedirs(dst, exist_ok=True)
  checkpoint.save(enc_dir, {"params": params, "latent_avg": avg}, "e4e",
                  config, overwrite=overwrite)
  stylegan2.write_generator(gen_dir, g_tree, g_config, overwrite=overwrite)
  return dst


def main(argv=None):
  return cli_main(
      "Convert the released e4e checkpoint (encoder + its StyleGAN2 decoder).",
      lambda args: convert(args.src, args.dst, args.overwrite), argv)


if __name__ == "__main__":
  sys.exit(main())
