"""facer's FaRL face-parsing checkpoint (.pt) → dhr_jax parser checkpoint.

    python -m converters.farl --src face_parsing.farl.celebm.main_ema_181500_jit.pt --dst ckpt/farl

Accepted sources: facer's TorchScript file (read with
`torch.jit.load(...).state_dict()`), or a `torch.save`d plain state dict with
the same names (`backbone.visual.*`, `backbone.fpns.*`, `head.head.*`,
`backbone.image_mean/std`). The architecture is facer's `celebm/448` network
(FaRL-B/16 at 448², 19 classes); anything else is refused, naming the keys.
`backbone.visual.ln_post`/`proj` (CLIP's pooled embedding, unused for parsing)
and the BatchNorm counters are checked but not converted.
"""
import os
import sys
import zipfile

import numpy as np

from converters.common import (ConversionError, check_keys, cli_main,
                               conv_to_hwio, to_numpy, torch_load)
from dhr_jax import checkpoint
from dhr_jax.models.farl import DEFAULT_CONFIG, KIND

_BN = ("weight", "bias", "running_mean", "running_var")
_CONV_MODULES = ("bottleneck", "fpn_bottleneck")


def expected_shapes(config=DEFAULT_CONFIG):
  """{official key: shape} of facer's parsing network for `config`."""
  w, p = config["width"], config["patch_size"]
  grid = config["input_size"] // p
  ch, nc = config["channels"], config["num_classes"]
  v = "backbone.visual."
  e = {
      "backbone.image_mean": (1, 3, 1, 1),
      "backbone.image_std": (1, 3, 1, 1),
      v + "class_embedding": (w,),
      v + "positional_embedding": (grid * grid + 1, w),
      v + "proj": (w, 512),
      v + "conv1.weight": (w, 3, p, p),
      v + "ln_pre.weight": (w,), v + "ln_pre.bias": (w,),
      v + "ln_post.weight": (w,), v + "ln_post.bias": (w,),
  }
  for i in range(config["layers"]):
    b = f"{v}transformer.resblocks.{i}."
    e.update({
        b + "attn.in_proj_weight": (3 * w, w),
        b + "attn.in_proj_bias": (3 * w,),
        b + "attn.out_proj.weight": (w, w),
        b + "attn.out_proj.bias": (w,),
        b + "ln_1.weight": (w,), b + "ln_1.bias": (w,),
        b + "ln_2.weight": (w,), b + "ln_2.bias": (w,),
        b + "mlp.c_fc.weight": (4 * w, w), b + "mlp.c_fc.bias": (4 * w,),
        b + "mlp.c_proj.weight": (w, 4 * w), b + "mlp.c_proj.bias": (w,),
    })
  for name in ("fpns.0.0", "fpns.0.3", "fpns.1"):
    e[f"backbone.{name}.weight"] = (w, w, 2, 2)
    e[f"backbone.{name}.bias"] = (w,)
  for s in _BN:
    e[f"backbone.fpns.0.1.{s}"] = (w,)
  h = "head.head."
  n_in = len(config["output_indices"])
  convs = {f"psp_modules.{i}.1": (ch, w, 1, 1)
           for i in range(len(config["pool_scales"]))}
  convs["bottleneck"] = (ch, w + len(config["pool_scales"]) * ch, 3, 3)
  for i in range(n_in - 1):
    convs[f"lateral_convs.{i}"] = (ch, w, 1, 1)
    convs[f"fpn_convs.{i}"] = (ch, ch, 3, 3)
  convs["fpn_bottleneck"] = (ch, n_in * ch, 3, 3)
  for name, shape in convs.items():
    e[f"{h}{name}.conv.weight"] = shape
    for s in _BN:
      e[f"{h}{name}.bn.{s}"] = (ch,)
  e[h + "conv_seg.weight"] = (nc, ch, 1, 1)
  e[h + "conv_seg.bias"] = (nc,)
  return e


def _is_torchscript(path):
  try:
    with zipfile.ZipFile(path) as z:
      names = z.namelist()
  except (zipfile.BadZipFile, OSError):
    return False
  return any("/code/" in n or n.endswith("constants.pkl") for n in names)


def read_state_dict(path):
  """{name: numpy array} from a TorchScript file or a saved state dict."""
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise ConversionError(f"{path}: no such file")
  if _is_torchscript(path):
    import torch
    try:
      sd = torch.jit.load(path, map_location="cpu").state_dict()
    except Exception as e:  # torch raises many types for a bad archive
      raise ConversionError(
          f"{path}: looks like TorchScript but torch.jit.load failed "
          f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})."
      ) from None
  else:
    sd = torch_load(path)
  if isinstance(sd, dict) and set(sd) == {"state_dict"}:
    sd = sd["state_dict"]
  if not isinstance(sd, dict) or not all(isinstance(k, str) for k in sd):
    raise ConversionError(
        f"{path}: expected facer's TorchScript parser or a state dict "
        f"{{name: tensor}}, got {type(sd).__name__}.")
  return to_numpy(sd)


def _conv_t(w):
  """torch ConvTranspose (in, out, kh, kw) → (kh, kw, in, out)."""
  return np.transpose(w, (2, 3, 0, 1))


def _dense(sd, name):
  return {"kernel": sd[name + ".weight"].T, "bias": sd[name + ".bias"]}


def _ln(sd, name):
  return {"scale": sd[name + ".weight"], "bias": sd[name + ".bias"]}


def _bn(sd, name):
  return ({"scale": sd[name + ".weight"], "bias": sd[name + ".bias"]},
          {"mean": sd[name + ".running_mean"], "var": sd[name + ".running_var"]})


def convert_state_dict(sd, src="state dict", config=DEFAULT_CONFIG):
  """Official state dict → (Flax variables {'params', 'batch_stats'}, config)."""
  ignore = [k for k in sd if k.endswith("num_batches_tracked")]
  check_keys(src, sd, expected_shapes(config), ignore=ignore)
  sd = {k: np.asarray(v, np.float32) for k, v in sd.items() if k not in ignore}
  v = "backbone.visual."
  visual = {
      "conv1": {"kernel": conv_to_hwio(sd[v + "conv1.weight"])},
      "class_embedding": sd[v + "class_embedding"],
      "positional_embedding": sd[v + "positional_embedding"],
      "ln_pre": _ln(sd, v + "ln_pre"),
  }
  for i in range(config["layers"]):
    b = f"{v}transformer.resblocks.{i}."
    visual[f"resblocks_{i}"] = {
        "attn": {
            "in_proj": {"kernel": sd[b + "attn.in_proj_weight"].T,
                        "bias": sd[b + "attn.in_proj_bias"]},
            "out_proj": _dense(sd, b + "attn.out_proj"),
        },
        "ln_1": _ln(sd, b + "ln_1"), "ln_2": _ln(sd, b + "ln_2"),
        "c_fc": _dense(sd, b + "mlp.c_fc"),
        "c_proj": _dense(sd, b + "mlp.c_proj"),
    }

  def conv_t(name):
    return {"kernel": _conv_t(sd[name + ".weight"]), "bias": sd[name + ".bias"]}

  bn_p, bn_s = _bn(sd, "backbone.fpns.0.1")
  fpns = {"fpn0_up1": conv_t("backbone.fpns.0.0"), "fpn0_bn": bn_p,
          "fpn0_up2": conv_t("backbone.fpns.0.3"),
          "fpn1_up": conv_t("backbone.fpns.1")}
  params = {"backbone": {
      "image_mean": sd["backbone.image_mean"].reshape(3),
      "image_std": sd["backbone.image_std"].reshape(3),
      "visual": visual, "fpns": fpns}}
  stats = {"backbone": {"fpns": {"fpn0_bn": bn_s}}}

  h = "head.head."
  names = {f"psp_modules_{i}": f"psp_modules.{i}.1"
           for i in range(len(config["pool_scales"]))}
  for i in range(len(config["output_indices"]) - 1):
    names[f"lateral_convs_{i}"] = f"lateral_convs.{i}"
    names[f"fpn_convs_{i}"] = f"fpn_convs.{i}"
  for n in _CONV_MODULES:
    names[n] = n
  head_p, head_s = {}, {}
  for ours, theirs in names.items():
    p, s = _bn(sd, f"{h}{theirs}.bn")
    head_p[ours] = {"conv": {"kernel": conv_to_hwio(sd[f"{h}{theirs}.conv.weight"])},
                    "bn": p}
    head_s[ours] = {"bn": s}
  head_p["conv_seg"] = {"kernel": conv_to_hwio(sd[h + "conv_seg.weight"]),
                        "bias": sd[h + "conv_seg.bias"]}
  params["head"] = head_p
  stats["head"] = head_s
  cfg = {k: list(v) if isinstance(v, tuple) else v for k, v in config.items()}
  return {"params": params, "batch_stats": stats}, cfg


def convert(src, dst, overwrite=False):
  """Converts the file `src` into the checkpoint directory `dst`."""
  sd = read_state_dict(src)
  tree, config = convert_state_dict(sd, src)
  config["source"] = os.path.basename(os.fspath(src))
  return checkpoint.save(dst, tree, KIND, config, overwrite=overwrite)


def main(argv=None):
  return cli_main(
      "Convert facer's FaRL face-parsing checkpoint (celebm/448) to dhr_jax.",
      lambda args: convert(args.src, args.dst, args.overwrite), argv)


if __name__ == "__main__":
  sys.exit(main())
