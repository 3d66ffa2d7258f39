"""StyleGAN2 generator (rosinality .pt; NVIDIA .pkl, never executed) ⇄ dhr_jax.

    python -m converters.stylegan2 --src stylegan2-ffhq-config-f.pt --dst ckpt/ffhq
    python -m converters.stylegan2 --src network-snapshot.pkl --dst ckpt/ada
    python -m converters.stylegan2 --to-torch --src ckpt/refined --dst refined.pt

Accepted sources: {'g_ema': state_dict, 'latent_avg'?} (rosinality), a
pSp/e4e/HFGI bundle {'state_dict': {'decoder.*': ...}, 'latent_avg'?}, a
GANInverter checkpoint {'decoder': state_dict, 'encoder': {'latent_avg',
...}?, ...}, or a bare state dict.
The architecture (size, style_dim, n_mlp, channels, z_dim, layer_features)
is read off the shapes.
An NVIDIA stylegan2-ada-pytorch pickle is read by converters/nvidia_pickle.py
(nothing in the file is executed or imported; NVIDIA's code is not needed)
and its G_ema mapped by converters/stylegan2_ada.py, which says what differs
and what is refused. `--to-torch` writes the rosinality layout, plus
{'config': {'conv_clamp', 'lr_mlp'}} for what that layout cannot express.
"""
import math
import os
import re
import sys

import jax
import jax.numpy as jnp
import numpy as np

from converters import nvidia_pickle, stylegan2_ada
from converters.common import (ConversionError, check_keys, cli_main,
                               to_numpy, torch_load)
from dhr_jax import checkpoint
from dhr_jax.models import ops
from dhr_jax.models.stylegan2 import (KIND, Generator, generator_config,
                                      noise_shapes)
from dhr_jax.models.stylegan2 import load as load_generator

_LISTS = ("style", "convs", "to_rgbs")
# Config a .pt records beside 'g_ema' (--to-torch), with the defaults of a
# file that records nothing.
_RECORDED = {"conv_clamp": None, "lr_mlp": 0.01}
_FIR = ops.fir_kernel(gain=4.0)


def official_to_path(name):
  """'convs.3.conv.weight' → ('synthesis', 'convs_3', 'conv', 'weight')."""
  parts = name.split(".")
  path = []
  for p in parts:
    if p.isdigit() and path and path[-1] in _LISTS:
      path[-1] = f"{path[-1]}_{p}"
    else:
      path.append(p)
  top = "mapping" if path[0].startswith("style_") else "synthesis"
  return (top, *path)


def path_to_official(path):
  out = []
  for p in path[1:]:
    m = re.fullmatch(r"(style|convs|to_rgbs)_(\d+)", p)
    out.extend([m.group(1), m.group(2)] if m else [p])
  return ".".join(out)


def flatten_official(params):
  """{official state-dict name: leaf} of a params tree; public because
  tests and bench/ name weights (and their gradients) the official way."""
  flat = {}
  for kp, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
    path = tuple(k.key for k in kp)
    flat[path_to_official(path)] = leaf
  return flat


def _fixed_buffers(config):
  """Official non-parameter buffers: FIR kernels (values fixed by the architecture)."""
  out = {}
  n_up = int(math.log2(config["size"])) - 2
  for j in range(n_up):
    out[f"convs.{2 * j}.conv.blur.kernel"] = _FIR
    out[f"to_rgbs.{j}.upsample.kernel"] = _FIR
  return out


def infer_config(sd, src):
  """Architecture from state-dict shapes; a clear error if it isn't StyleGAN2."""
  try:
    n_mlp = len([k for k in sd if re.fullmatch(r"style\.\d+\.weight", k)])
    # rosinality's mapping is style_dim wide throughout; one converted from
    # NVIDIA's may take a wider or narrower z and have other hidden widths.
    first = np.shape(sd["style.1.weight"])
    z_dim, layer_features = first[-1], first[0]  # (out, in); check_keys vets
    style_dim = sd[f"style.{n_mlp}.weight"].shape[0]
    n_rgb = len([k for k in sd if re.fullmatch(r"to_rgbs\.\d+\.conv\.weight", k)])
    size = 2 ** (n_rgb + 2)
    channels = {4: sd["input.input"].shape[1]}
    for j in range(n_rgb):
      channels[2 ** (j + 3)] = sd[f"convs.{2 * j}.conv.weight"].shape[1]
    lr_mlp = 0.01
  except KeyError as e:
    raise ConversionError(
        f"{src}: not a rosinality StyleGAN2 generator state dict (no key "
        f"{e.args[0]!r}); pass the .pt holding 'g_ema' or an e4e/pSp bundle."
    ) from None
  return generator_config(size, style_dim, n_mlp, channels, lr_mlp,
                          z_dim=z_dim, layer_features=layer_features)


def expected_shapes(config):
  """{official name: shape} of every entry a checkpoint of `config` holds."""
  g = Generator(config, None, None)
  z = jax.ShapeDtypeStruct((1, g.z_dim), jnp.float32)
  wp = jax.ShapeDtypeStruct((1, config["n_latent"], config["style_dim"]),
                            jnp.float32)
  noise = [jax.ShapeDtypeStruct(s, jnp.float32) for s in noise_shapes(config)]
  key = jax.random.PRNGKey(0)
  mp = jax.eval_shape(g.mapping_module.init, key, z)["params"]
  sp = jax.eval_shape(g.synthesis_module.init, key, wp, noise)["params"]
  shapes = {k: tuple(v.shape)
            for k, v in flatten_official({"mapping": mp, "synthesis": sp}).items()}
  for i, s in enumerate(noise_shapes(config)):
    shapes[f"noises.noise_{i}"] = (1, 1, s[1], s[2])
  for k, v in _fixed_buffers(config).items():
    shapes[k] = v.shape
  return shapes


def convert_generator(sd, src="<state dict>", latent_avg=None,
                      config_update=None):
  """{official name: numpy} → (tree, config) for `write_generator`.

  Refuses, naming the keys, on any missing, unexpected or mis-shaped entry.
  latent_avg: (style_dim,) or (n_latent, style_dim) (rows averaged; they are
  equal in released e4e/pSp checkpoints). config_update: what the shapes do
  not tell, e.g. {'conv_clamp': 256.0, 'lr_mlp': 0.01} of an NVIDIA net.
  """
  config = infer_config(sd, src)
  config.update(config_update or {})
  check_keys(src, sd, expected_shapes(config))
  for k, v in _fixed_buffers(config).items():
    if not np.allclose(sd[k], v):
      raise ConversionError(
          f"{src}: {k} is not the [1,3,3,1] blur kernel this architecture "
          "uses; a generator with another FIR kernel is not supported.")
  params = {}
  for name, value in sd.items():
    if name.startswith("noises.") or name in _fixed_buffers(config):
      continue
    node = params
    *parents, leaf = official_to_path(name)
    for p in parents:
      node = node.setdefault(p, {})
    node[leaf] = np.asarray(value, np.float32)
  noise = {str(i): np.transpose(np.asarray(sd[f"noises.noise_{i}"], np.float32),
                                (0, 2, 3, 1))
           for i in range(config["num_layers"])}
  tree = {"params": params, "noise": noise}
  if latent_avg is not None:
    la = np.asarray(latent_avg, np.float32)
    if la.ndim == 2:
      la = la.mean(axis=0)
    if la.shape != (config["style_dim"],):
      raise ConversionError(
          f"{src}: latent_avg has shape {np.shape(latent_avg)}, expected "
          f"({config['style_dim']},) or (n, {config['style_dim']})")
    tree["latent_avg"] = la
  return tree, config


def write_generator(dst, tree, config, overwrite=False):
  return checkpoint.save(dst, tree, KIND, config, overwrite=overwrite)


def to_torch_state_dict(params, noise):
  """Generator params + noise maps → {official name: numpy}, loadable strictly
  by the official Generator (FIR kernel buffers included)."""
  sd = {k: np.asarray(v) for k, v in flatten_official(params).items()}
  for i, n in enumerate(noise):
    sd[f"noises.noise_{i}"] = np.transpose(np.asarray(n), (0, 3, 1, 2))
  n_rgb = len([k for k in sd if re.fullmatch(r"to_rgbs\.\d+\.conv\.weight", k)])
  sd.update(_fixed_buffers({"size": 2 ** (n_rgb + 2)}))
  return sd


def read_source(path, with_config=False):
  """A .pt in any accepted layout → ({official name: numpy}, latent_avg),
  and with_config the {'conv_clamp', 'lr_mlp'} a --to-torch export recorded."""
  ckpt = torch_load(path)
  if not isinstance(ckpt, dict):
    raise ConversionError(f"{path}: expected a dict checkpoint, got "
                          f"{type(ckpt).__name__}")
  latent_avg = ckpt.get("latent_avg")
  if "g_ema" in ckpt:
    sd = to_numpy(ckpt["g_ema"])
  elif "state_dict" in ckpt and any(k.startswith("decoder.")
                                    for k in ckpt["state_dict"]):
    sd = to_numpy(ckpt["state_dict"], prefix="decoder.")
  elif isinstance(ckpt.get("decoder"), dict):
    # GANInverter: one dict per network, latent_avg kept by the encoder.
    sd = to_numpy(ckpt["decoder"])
    enc = ckpt.get("encoder")
    latent_avg = enc.get("latent_avg") if isinstance(enc, dict) else None
  elif "style.1.weight" in ckpt:
    sd, latent_avg = to_numpy(ckpt), None
  else:
    raise ConversionError(
        f"{path}: found neither 'g_ema' nor a 'state_dict' with 'decoder.*' "
        f"keys nor GANInverter's 'decoder' (top-level keys: "
        f"{sorted(ckpt)[:8]}); pass a rosinality StyleGAN2, an e4e/pSp/HFGI "
        "or a GANInverter checkpoint.")
  if latent_avg is not None:
    latent_avg = to_numpy({"x": latent_avg})["x"]
  if with_config:
    recorded = ckpt.get("config") if isinstance(ckpt.get("config"), dict) else {}
    arch = {k: recorded[k] for k in _RECORDED if k in recorded}
    for k, v in arch.items():
      if not (isinstance(v, (int, float)) or (v is None and k == "conv_clamp")):
        raise ConversionError(f"{path}: config[{k!r}] is {v!r}, not a number")
    return sd, latent_avg, arch
  return sd, latent_avg


def _convert(args):
  if args.to_torch:
    import torch
    if os.path.exists(args.dst) and not args.overwrite:
      raise ConversionError(f"{args.dst} exists; pass --overwrite to replace it")
    g = load_generator(args.src)
    sd = to_torch_state_dict(g.params, g.noise)
    # Copies: arrays read back by orbax are read-only, torch wants writable.
    out = {"g_ema": {k: torch.from_numpy(np.array(v))
                     for k, v in sd.items()}}
    if g.latent_avg is not None:
      out["latent_avg"] = torch.from_numpy(np.array(g.latent_avg))
    # The rosinality layout has no place for these; recorded so that they
    # are not lost (read back by this converter).
    out["config"] = {k: g.config.get(k, _RECORDED[k]) for k in _RECORDED}
    if out["config"]["conv_clamp"] is not None:
      print(f"note: conv_clamp={out['config']['conv_clamp']} is recorded in "
            f"{args.dst}['config']; rosinality's Generator does not clamp, so "
            "its images differ where activations exceed it", file=sys.stderr)
    c = g.config
    if (g.z_dim, c.get("layer_features") or c["style_dim"]) != (
        c["style_dim"],) * 2:
      print(f"note: the mapping of {args.dst} takes z_dim={g.z_dim} through "
            f"layer_features={c['layer_features']} to style_dim="
            f"{c['style_dim']}; rosinality's Generator has one width and "
            "cannot load it (this converter reads it back)", file=sys.stderr)
    torch.save(out, args.dst)
    return args.dst
  if nvidia_pickle.is_pickle(args.src):
    sd, latent_avg, arch = stylegan2_ada.read_pickle(args.src)
  else:
    sd, latent_avg, arch = read_source(args.src, with_config=True)
  tree, config = convert_generator(sd, args.src, latent_avg, arch)
  return write_generator(args.dst, tree, config, args.overwrite)


def _args(parser):
  parser.add_argument("--to-torch", action="store_true",
                      help="convert a dhr_jax checkpoint back to .pt")
  parser.epilog = (
      "--src is a rosinality/e4e/pSp .pt (read with torch.load("
      "weights_only=True)) or an NVIDIA stylegan2-ada-pytorch network .pkl. "
      "The .pkl is never executed: a restricted reader builds only tensors, "
      "plain containers and module records, imports nothing from the file "
      "(NVIDIA's code is not needed) and refuses any other global by name. "
      "Refused: conditional generators (c_dim > 0), architecture other than "
      "'skip', StyleGAN3 pickles (a different architecture). z_dim and the "
      "mapping's layer_features may differ from w_dim.")


def main(argv=None):
  return cli_main(__doc__.splitlines()[0], _convert, argv, _args,
                  dst_is_file=lambda args: args.to_torch)


if __name__ == "__main__":
  sys.exit(main())
