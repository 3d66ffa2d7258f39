"""NVIDIA stylegan2-ada-pytorch `G_ema` → the rosinality-layout state dict
that converters/stylegan2.py converts.

The pickle is read by converters/nvidia_pickle.py (nothing in it is
executed); the architecture — z and w dimensions, the mapping's hidden
width (layer_features), resolution, channels per resolution, mapping depth
and lr multiplier, conv_clamp — comes from the modules' attributes and
tensor shapes in the file.

NVIDIA's generator and the rosinality one compute the same function apart
from `conv_clamp`, which the dhr_jax generator takes as config. Checked
against NVIDIA's code, layer by layer:
- mapping: normalize_2nd_moment(z) is PixelNorm (eps 1e-8 inside the rsqrt)
  over z's own width (z_dim); fc0 takes z_dim to layer_features, the last
  layer gives w_dim (the dhr_jax config's z_dim, layer_features, style_dim);
  FullyConnectedLayer's gains (lr/√fan_in on the weight, lr on the bias,
  weights stored ÷lr) and bias_act lrelu (0.2, gain √2) are EqualLinear +
  fused_leaky_relu; `mapping.w_avg` is latent_avg, and truncation is the
  same lerp (`truncate(w, ψ, G.latent_avg)`).
- affine: FullyConnectedLayer(bias_init=1) is the modulation EqualLinear.
- SynthesisLayer: the weight carries no 1/√fan_in gain, which demodulation
  divides out; NVIDIA adds its 1e-8 to Σ(w·s)² of the unscaled weight, ours
  to the scaled one: a relative difference of (fan_in − 1)·1e-8 / (2Σ(w·s)²),
  below float32 resolution unless the styles vanish.
  Noise `noise_const · noise_strength` is added after demodulation, then
  bias, lrelu, gain √2, then the clamp to ±conv_clamp.
- conv0 (up=2): transposed stride-2 conv, then the [1,3,3,1] filter with
  gain 4 and padding (1, 1) — rosinality's upsampling conv + Blur exactly.
- ToRGB: 1/√fan_in on the styles instead of the weight (same product), no
  demodulation, bias, then the clamp; the skip image is upsampled with the
  same filter, padding (2, 1), gain 4, before the new ToRGB is added.
- ws: block b4 uses ws[0] (conv1), ws[1] (torgb); block 2^(j+3) uses
  ws[2j+1], ws[2j+2], ws[2j+3] — rosinality's latent indices.
fp16 blocks (num_fp16_res > 0) run in float32 here: their outputs match
NVIDIA's float32 evaluation (`force_fp32=True`), not its fp16 one.

Refused, naming the reason: conditional generators (c_dim > 0),
architecture other than 'skip', StyleGAN3 generators (a different,
alias-free architecture), img_channels ≠ 3, a generator without z
(z_dim = 0), a resampling filter other than [1,3,3,1], layers with other
activations/kernels.
"""
import re
import sys

import numpy as np

from converters import nvidia_pickle
from converters.common import ConversionError, check_keys
from dhr_jax.models import ops

_FILTER = ops.fir_kernel()  # setup_filter([1,3,3,1]): sum 1


def _refuse(src, what):
  raise ConversionError(f"{src}: {what}")


def _module(parent, name, src, path):
  child = parent.modules.get(name)
  if not isinstance(child, nvidia_pickle.PersistentModule):
    _refuse(src, f"{path}{name} is missing; not a stylegan2-ada-pytorch "
            "Generator")
  return child


def _attr(module, name, src, path):
  if name not in module.attrs:
    _refuse(src, f"{path} has no attribute {name!r}; not a "
            "stylegan2-ada-pytorch Generator")
  return module.attrs[name]


def _only(values, what, src):
  distinct = set(values.values())
  if len(distinct) != 1:
    _refuse(src, f"{what} differs between layers ({values}); dhr_jax uses "
            "one value for all")
  return distinct.pop()


def read_g_ema(data, src):
  """Loaded pickle → ({rosinality name: array}, latent_avg, config update).

  config update: {'conv_clamp', 'lr_mlp'} for generator_config.
  """
  if not isinstance(data, dict) or "G_ema" not in data:
    keys = sorted(data)[:8] if isinstance(data, dict) else type(data).__name__
    _refuse(src, f"no 'G_ema' in the pickle (found {keys}); pass a "
            "stylegan2-ada-pytorch network-snapshot .pkl")
  g = data["G_ema"]
  if not isinstance(g, nvidia_pickle.PersistentModule):
    _refuse(src, "G_ema is not a persistent torch module")
  syn = _module(g, "synthesis", src, "G_ema.")
  if "b4" not in syn.modules and ("input" in syn.modules or any(
      re.fullmatch(r"L\d+_\d+_\d+", k) for k in syn.modules)):
    _refuse(src, "a StyleGAN3 generator (synthesis.input + L*_ layers): a "
            "different, alias-free architecture that dhr_jax does not "
            "implement; only StyleGAN2 (stylegan2-ada-pytorch) converts")
  if g.class_name != "Generator" or syn.class_name != "SynthesisNetwork":
    _refuse(src, f"G_ema is a {g.class_name} with a {syn.class_name}, "
            "not a stylegan2-ada-pytorch Generator")
  c_dim = _attr(g, "c_dim", src, "G_ema")
  if c_dim:
    _refuse(src, f"a conditional generator (c_dim={c_dim}); dhr_jax's "
            "generator has no class input")
  z_dim, w_dim = _attr(g, "z_dim", src, "G_ema"), _attr(g, "w_dim", src, "G_ema")
  if not z_dim:
    _refuse(src, f"z_dim={z_dim!r}: a generator without a latent input")
  if _attr(g, "img_channels", src, "G_ema") != 3:
    _refuse(src, f"img_channels={g.attrs['img_channels']}; only RGB "
            "generators convert")
  size = _attr(g, "img_resolution", src, "G_ema")
  if not isinstance(size, int) or size < 8 or size & (size - 1):
    _refuse(src, f"img_resolution={size!r} is not a power of two ≥ 8")
  res = [2 ** i for i in range(2, int(np.log2(size)) + 1)]

  mapping = _module(g, "mapping", src, "G_ema.")
  n_mlp = _attr(mapping, "num_layers", src, "G_ema.mapping")
  fcs = {f"fc{i}": _module(mapping, f"fc{i}", src, "G_ema.mapping.")
         for i in range(n_mlp)}
  blocks = {r: _module(syn, f"b{r}", src, "G_ema.synthesis.") for r in res}
  for r, b in blocks.items():
    arch = b.attrs.get("architecture")
    if arch != "skip":
      _refuse(src, f"synthesis.b{r} has architecture={arch!r}; only 'skip' "
              "(the StyleGAN2 default, and rosinality's) converts")
  layers, torgbs = {}, {}
  for r, b in blocks.items():
    for name in (("conv1",) if r == 4 else ("conv0", "conv1")):
      layers[f"b{r}.{name}"] = _module(b, name, src, f"G_ema.synthesis.b{r}.")
    torgbs[f"b{r}.torgb"] = _module(b, "torgb", src, f"G_ema.synthesis.b{r}.")

  for name, fc in fcs.items():
    if fc.attrs.get("activation") != "lrelu":
      _refuse(src, f"mapping.{name} has activation "
              f"{fc.attrs.get('activation')!r}; only 'lrelu' converts")
  # FullyConnectedLayer keeps lr_multiplier as its bias_gain.
  lr_mlp = _only({n: float(_attr(fc, "bias_gain", src, f"mapping.{n}"))
                  for n, fc in fcs.items()}, "the mapping lr_multiplier", src)
  for name, m in {**layers, **torgbs}.items():
    affine = _module(m, "affine", src, f"synthesis.{name}.")
    if _attr(affine, "bias_gain", src, f"synthesis.{name}.affine") != 1:
      _refuse(src, f"synthesis.{name}.affine has lr_multiplier "
              f"{affine.attrs['bias_gain']}; only 1 converts")
  for name, layer in layers.items():
    if layer.attrs.get("activation") != "lrelu" or not layer.attrs.get(
        "use_noise"):
      _refuse(src, f"synthesis.{name} has activation "
              f"{layer.attrs.get('activation')!r}, use_noise="
              f"{layer.attrs.get('use_noise')!r}; only 'lrelu' with noise "
              "converts")
  clamps = {n: m.attrs.get("conv_clamp") for n, m in {**layers, **torgbs}.items()}
  conv_clamp = _only(clamps, "conv_clamp", src)
  conv_clamp = None if conv_clamp is None else float(conv_clamp)

  nv = nvidia_pickle.state_dict(g)
  # MappingNetwork keeps layer_features only as the hidden layers' shape.
  fc0 = nv.get("mapping.fc0.weight")
  if fc0 is None or np.ndim(fc0) != 2:
    _refuse(src, "missing mapping.fc0.weight")
  layer_features = fc0.shape[0] if n_mlp > 1 else w_dim
  channels = {}
  for r in res:
    w = nv.get(f"synthesis.b{r}.conv1.weight")
    if w is None:
      _refuse(src, f"missing synthesis.b{r}.conv1.weight")
    channels[r] = w.shape[0]
  check_keys(src, nv, _nvidia_shapes(size, (z_dim, layer_features, w_dim),
                                     n_mlp, channels,
                                     "w_avg" in mapping.buffers))
  for name in [k for k in nv if k.endswith("resample_filter")]:
    if not np.allclose(nv[name], _FILTER):
      _refuse(src, f"{name} is not the [1,3,3,1] filter; a generator with "
              "another resampling filter is not supported")
  fp16 = [f"b{r}" for r, b in blocks.items() if b.attrs.get("use_fp16")]
  if fp16:
    print(f"note: {src}: blocks {', '.join(fp16)} ran in fp16 in NVIDIA's code; "
          "they run in float32 here", file=sys.stderr)
  return (_to_rosinality(nv, res), nv.get("mapping.w_avg"),
          {"conv_clamp": conv_clamp, "lr_mlp": lr_mlp})


def _nvidia_shapes(size, widths, n_mlp, channels, with_w_avg):
  """{NVIDIA state-dict name: shape} of an unconditional 'skip' Generator;
  widths: (z_dim, layer_features, w_dim)."""
  z_dim, hidden, w_dim = widths
  features = [z_dim] + [hidden] * (n_mlp - 1) + [w_dim]
  out = {}
  for i in range(n_mlp):
    out[f"mapping.fc{i}.weight"] = (features[i + 1], features[i])
    out[f"mapping.fc{i}.bias"] = (features[i + 1],)
  if with_w_avg:
    out["mapping.w_avg"] = (w_dim,)

  def layer(name, c_in, c_out, r):
    out.update({
        f"{name}.weight": (c_out, c_in, 3, 3), f"{name}.bias": (c_out,),
        f"{name}.affine.weight": (c_in, w_dim), f"{name}.affine.bias": (c_in,),
        f"{name}.noise_strength": (), f"{name}.noise_const": (r, r),
        f"{name}.resample_filter": (4, 4)})

  def torgb(name, c_in):
    out.update({
        f"{name}.weight": (3, c_in, 1, 1), f"{name}.bias": (3,),
        f"{name}.affine.weight": (c_in, w_dim), f"{name}.affine.bias": (c_in,)})

  r = 4
  while r <= size:
    b = f"synthesis.b{r}"
    out[f"{b}.resample_filter"] = (4, 4)
    if r == 4:
      out[f"{b}.const"] = (channels[4], 4, 4)
    else:
      layer(f"{b}.conv0", channels[r // 2], channels[r], r)
    layer(f"{b}.conv1", channels[r], channels[r], r)
    torgb(f"{b}.torgb", channels[r])
    r *= 2
  return out


def _to_rosinality(nv, res):
  """NVIDIA names and layouts → rosinality's (noise maps as noises.noise_i)."""
  sd = {}
  for name, value in nv.items():
    m = re.fullmatch(r"mapping\.fc(\d+)\.(weight|bias)", name)
    if m:
      sd[f"style.{int(m.group(1)) + 1}.{m.group(2)}"] = value
  sd["input.input"] = nv["synthesis.b4.const"][None]

  def layer(dst, src, noise_idx):
    sd[f"{dst}.conv.weight"] = nv[f"{src}.weight"][None]
    sd[f"{dst}.conv.modulation.weight"] = nv[f"{src}.affine.weight"]
    sd[f"{dst}.conv.modulation.bias"] = nv[f"{src}.affine.bias"]
    sd[f"{dst}.noise.weight"] = nv[f"{src}.noise_strength"].reshape(1)
    sd[f"{dst}.activate.bias"] = nv[f"{src}.bias"]
    sd[f"noises.noise_{noise_idx}"] = nv[f"{src}.noise_const"][None, None]

  def torgb(dst, src):
    sd[f"{dst}.conv.weight"] = nv[f"{src}.weight"][None]
    sd[f"{dst}.conv.modulation.weight"] = nv[f"{src}.affine.weight"]
    sd[f"{dst}.conv.modulation.bias"] = nv[f"{src}.affine.bias"]
    sd[f"{dst}.bias"] = nv[f"{src}.bias"].reshape(1, 3, 1, 1)

  layer("conv1", "synthesis.b4.conv1", 0)
  torgb("to_rgb1", "synthesis.b4.torgb")
  for j, r in enumerate(res[1:]):
    layer(f"convs.{2 * j}", f"synthesis.b{r}.conv0", 2 * j + 1)
    layer(f"convs.{2 * j + 1}", f"synthesis.b{r}.conv1", 2 * j + 2)
    torgb(f"to_rgbs.{j}", f"synthesis.b{r}.torgb")
    # rosinality's fixed FIR buffers (its upsampling blur, ToRGB upsample)
    # are NVIDIA's filters times the gain up² = 4 that upfirdn2d applies.
    sd[f"convs.{2 * j}.conv.blur.kernel"] = (
        nv[f"synthesis.b{r}.conv0.resample_filter"] * 4.0)
    sd[f"to_rgbs.{j}.upsample.kernel"] = (
        nv[f"synthesis.b{r}.resample_filter"] * 4.0)
  return sd


def read_pickle(path):
  """An NVIDIA .pkl → (rosinality state dict, latent_avg, config update)."""
  return read_g_ema(nvidia_pickle.load(path), path)
