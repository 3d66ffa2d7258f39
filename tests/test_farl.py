"""FaRL face parser: parity with facer's network, converter refusals, alignment."""
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import rel_l2
from converters import farl as conv
from converters.common import ConversionError, conv_to_hwio
from dhr_jax import alignment
from dhr_jax import checkpoint
from dhr_jax.models import farl, ops

GOLDEN_NAME = "farl_parsing_448"


def _nchw(x):
  return torch.from_numpy(np.asarray(x).transpose(0, 3, 1, 2).copy())


def _nhwc(t):
  return t.detach().numpy().transpose(0, 2, 3, 1)


# ------------------------------------------------ primitives against PyTorch

@pytest.mark.parametrize("n_in,n_out", [(14, 112), (3, 14), (1, 14),
                                        (112, 512), (100, 37), (64, 448),
                                        (1024, 448), (7, 7)])
def test_resize_matches_torch_bilinear(n_in, n_out):
  x = np.random.RandomState(0).randn(2, n_in, n_in + 3, 4).astype(np.float32)
  size = (n_out, n_out + 5)
  ours = ops.resize_bilinear_torch(jnp.asarray(x), size)
  # In float64: float32 PyTorch rounds its source positions (4e-4 at
  # 1024→448). Ours is ≤ 4.9e-7 from it (bench/float_precision.py --part
  # primitives, 1024→448, 100→37, 14→112): 2e-6 leaves 4×.
  ref = F.interpolate(_nchw(x).double(), size=size, mode="bilinear",
                      align_corners=False, antialias=False)
  np.testing.assert_allclose(ours, _nhwc(ref), atol=2e-6, rtol=0)


@pytest.mark.parametrize("n_in,n_out", [(14, 1), (14, 2), (14, 3), (14, 6),
                                        (13, 5), (7, 7)])
def test_adaptive_pool_matches_torch(n_in, n_out):
  x = np.random.RandomState(1).randn(1, n_in, n_in, 3).astype(np.float32)
  ours = ops.adaptive_avg_pool(jnp.asarray(x), n_out)
  ref = F.adaptive_avg_pool2d(_nchw(x), n_out)
  # Measured (14→3, 13→5): ours and torch each ≤ 1.0e-7 from float64,
  # 1.2e-7 apart; 1e-6 leaves 8×.
  np.testing.assert_allclose(ours, _nhwc(ref), atol=1e-6, rtol=0)


def test_bilinear_sample_matches_grid_sample():
  rs = np.random.RandomState(2)
  img = rs.randn(9, 13, 3).astype(np.float32)
  # Points inside, near and beyond every border.
  xy = np.stack([rs.uniform(-2.0, 14.0, (6, 7)),
                 rs.uniform(-2.0, 10.0, (6, 7))], -1).astype(np.float32)
  ours = alignment.bilinear_sample(jnp.asarray(img), jnp.asarray(xy))
  grid = (2.0 * xy + 1.0) / np.array([13, 9], np.float32) - 1.0
  ref = F.grid_sample(_nchw(img[None]), torch.from_numpy(grid[None]),
                      mode="bilinear", padding_mode="zeros",
                      align_corners=False)
  # Measured: ours 1.3e-6 and torch 1.1e-6 from float64 (source positions
  # rounded in float32), 1.5e-6 apart; 1e-5 leaves 6×.
  np.testing.assert_allclose(ours, _nhwc(ref)[0], atol=1e-5, rtol=0)


def test_layer_layouts_match_torch():
  """Converted weights in our layers give the PyTorch layers' numbers."""
  # Outputs of size ~1 summed from ≤ 45 products in float32 by two
  # libraries: each ≲ 45 · 6e-8 ≈ 3e-6 from exact at worst, so 1e-5.
  torch.manual_seed(0)
  rs = np.random.RandomState(3)
  # ConvTranspose 2×2 stride 2.
  up = torch.nn.ConvTranspose2d(6, 5, 2, stride=2)
  x = rs.randn(2, 4, 3, 6).astype(np.float32)
  ours = farl.ConvTranspose2x2(5).apply(
      {"params": {"kernel": conv._conv_t(up.weight.detach().numpy()),
                  "bias": up.bias.detach().numpy()}}, jnp.asarray(x))
  np.testing.assert_allclose(ours, _nhwc(up(_nchw(x))), atol=1e-5)
  # Packed-projection multi-head attention, sequence-first in PyTorch.
  mha = torch.nn.MultiheadAttention(16, 4)
  x = rs.randn(2, 7, 16).astype(np.float32)
  sd = {k: v.detach().numpy() for k, v in mha.state_dict().items()}
  ours = farl.MultiheadAttention(4).apply({"params": {
      "in_proj": {"kernel": sd["in_proj_weight"].T,
                  "bias": sd["in_proj_bias"]},
      "out_proj": {"kernel": sd["out_proj.weight"].T,
                   "bias": sd["out_proj.bias"]}}}, jnp.asarray(x))
  ref = mha(*[torch.from_numpy(x.transpose(1, 0, 2))] * 3,
            need_weights=False)[0].detach().numpy().transpose(1, 0, 2)
  np.testing.assert_allclose(ours, ref, atol=1e-5)
  # mmseg ConvModule: 3×3 conv (no bias) → eval BatchNorm → ReLU.
  c = torch.nn.Conv2d(5, 4, 3, padding=1, bias=False)
  bn = torch.nn.BatchNorm2d(4).eval()
  bn.running_mean.copy_(torch.randn(4))
  bn.running_var.copy_(torch.rand(4) + 0.5)
  bn.weight.data.copy_(torch.randn(4))
  x = rs.randn(1, 6, 5, 5).astype(np.float32)
  ours = farl.ConvModule(4, 3).apply(
      {"params": {"conv": {"kernel": conv_to_hwio(c.weight.detach().numpy())},
                  "bn": {"scale": bn.weight.detach().numpy(),
                         "bias": bn.bias.detach().numpy()}},
       "batch_stats": {"bn": {"mean": bn.running_mean.numpy(),
                              "var": bn.running_var.numpy()}}},
      jnp.asarray(x))
  np.testing.assert_allclose(ours, _nhwc(F.relu(bn(c(_nchw(x))))), atol=1e-5)


# ------------------------------------------------------------------ converter

def _zeros_state_dict():
  """Every official key at its official shape (zeros are allocated lazily)."""
  sd = {k: np.zeros(s, np.float32) for k, s in conv.expected_shapes().items()}
  for k in list(sd):
    if k.endswith("running_var"):
      sd[k[:-len("running_var")] + "num_batches_tracked"] = np.zeros((), np.int64)
  return sd


def test_converted_tree_matches_network():
  tree, config = conv.convert_state_dict(_zeros_state_dict())
  net = farl.network_from_config(config)
  want = jax.eval_shape(net.init, jax.random.PRNGKey(0),
                        jnp.zeros((1, 448, 448, 3)))
  shapes = lambda t: jax.tree_util.tree_map(lambda a: tuple(a.shape), t)
  assert shapes(tree) == shapes(want)
  assert tuple(config["labels"]) == farl.CELEBM_LABELS


def test_golden_manifest_is_the_architecture_we_convert(golden):
  manifest, _ = golden(GOLDEN_NAME)
  got = {k: tuple(s) for k, s, d in manifest["entries"] if d.startswith("float")}
  assert got == conv.expected_shapes()
  assert tuple(manifest["meta"]["labels"]) == farl.CELEBM_LABELS


@pytest.mark.parametrize("change,needle", [
    (lambda sd: sd.pop("head.head.conv_seg.bias"),
     "missing keys: head.head.conv_seg.bias"),
    (lambda sd: sd.update({"head.head.aux.weight": np.zeros(3, np.float32)}),
     "unexpected keys: head.head.aux.weight"),
    (lambda sd: sd.update({"backbone.visual.positional_embedding":
                           np.zeros((197, 768), np.float32)}),
     "shape of backbone.visual.positional_embedding: checkpoint has "
     "(197, 768), expected (785, 768)"),
])
def test_converter_refuses_wrong_keys(change, needle):
  sd = _zeros_state_dict()
  change(sd)
  with pytest.raises(ConversionError) as e:
    conv.convert_state_dict(sd, "bad.pt")
  assert needle in str(e.value)
  assert "bad.pt" in str(e.value)


class _Holder(torch.nn.Module):
  """A module whose only content is its state dict, to script under any names."""

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    return x


def _scripted(state_dict):
  root = _Holder()
  for key, value in state_dict.items():
    *mods, leaf = key.split(".")
    m = root
    for name in mods:
      if name not in m._modules:
        m.add_module(name, _Holder())
      m = m._modules[name]
    m.register_buffer(leaf, value)
  return torch.jit.script(root)


def test_cli_refuses_files_naming_keys(tmp_path, capsys):
  plain = tmp_path / "plain.pt"
  torch.save({"backbone.visual.class_embedding": torch.zeros(768)}, plain)
  scripted = tmp_path / "scripted.pt"
  _scripted({"backbone.visual.class_embedding": torch.zeros(768),
             "backbone.visual.extra_thing": torch.zeros(2)}).save(str(scripted))
  junk = tmp_path / "junk.pt"
  junk.write_bytes(b"not a checkpoint")

  assert conv.main(["--src", str(plain), "--dst", str(tmp_path / "a")]) == 2
  err = capsys.readouterr().err
  assert "plain.pt" in err and "missing keys:" in err
  assert "head.head.conv_seg.weight" in err
  # The TorchScript path reads names through torch.jit.load.
  assert conv.main(["--src", str(scripted), "--dst", str(tmp_path / "b")]) == 2
  err = capsys.readouterr().err
  assert "unexpected keys: backbone.visual.extra_thing" in err
  assert "backbone.visual.conv1.weight" in err
  assert conv.main(["--src", str(junk), "--dst", str(tmp_path / "c")]) == 2
  assert "junk.pt" in capsys.readouterr().err
  assert not any((tmp_path / d).exists() for d in "abc")


# ------------------------------------------------------------------ alignment

def test_similarity_fit_recovers_transform():
  angle, scale, shift = 0.3, 1.7, np.array([12.0, -5.0])
  rot = scale * np.array([[np.cos(angle), -np.sin(angle)],
                          [np.sin(angle), np.cos(angle)]])
  src = alignment.ffhq_landmarks(256)
  dst = src @ rot.T + shift
  m = alignment.similarity_matrix(src[None], dst[None].astype(np.float32))[0]
  # A float32 least-squares fit on coordinates ~250 px: ulp(256) = 3e-5, so
  # ~1e-5 on the (scale ~1.7) matrix, ~3e-3 px on the shift; a round trip
  # through the inverse adds the same again.
  np.testing.assert_allclose(m[:, :2], rot, atol=1e-4)
  np.testing.assert_allclose(m[:, 2], shift, atol=1e-2)
  back = alignment.apply_affine(alignment.invert_affine(m), dst)
  np.testing.assert_allclose(back, src, atol=1e-3)


def _face_box(size):
  """Landmark bounding box grown by half its size on every side."""
  lm = alignment.ffhq_landmarks(size)
  lo, hi = lm.min(0), lm.max(0)
  pad = 0.5 * (hi - lo)
  (x0, y0), (x1, y1) = np.floor(lo - pad).astype(int), np.ceil(hi + pad).astype(int)
  return slice(y0, y1 + 1), slice(x0, x1 + 1)


def _matrices(size, batch=1):
  lm = np.broadcast_to(alignment.ffhq_landmarks(size), (batch, 5, 2))
  return alignment.face_to_frame(lm)


def test_alignment_round_trip_is_identity_on_affine_ramps():
  # Bilinear sampling reproduces affine functions exactly, so any half-pixel
  # slip in either warp (or in the 448 → 512 map scaling) shows up here.
  s = 96
  ys, xs = np.mgrid[0:s, 0:s].astype(np.float32)
  img = np.stack([0.01 * xs - 0.02 * ys, 0.03 * ys + 0.1, 0.02 * xs], -1)[None]
  m = _matrices(s)
  frame = alignment.warp_to_frame(jnp.asarray(img), m)
  assert frame.shape == (1, 448, 448, 3)
  box = _face_box(s)
  back = alignment.warp_from_frame(frame, m, (s, s))
  # Values ≲ 2 through two float32 warps whose sample positions (~100 px)
  # carry ~1e-5 px rounding times slopes ≤ 0.03: ≪ 1e-4.
  np.testing.assert_allclose(back[0][box], img[0][box], atol=1e-4)
  # The same through a 512² map over the 448² frame (the logits' layout).
  frame512 = ops.resize_bilinear_torch(frame, (512, 512))
  back = alignment.warp_from_frame(frame512, m, (s, s))
  np.testing.assert_allclose(back[0][box], img[0][box], atol=1e-4)


@pytest.mark.parametrize("size", [128, 1024])
def test_alignment_round_trip_smooth_image(size):
  ys, xs = np.mgrid[0:size, 0:size].astype(np.float32) / size
  img = np.stack([np.sin(6 * xs + 1) * np.cos(5 * ys),
                  np.cos(4 * xs - 3 * ys), xs * ys], -1)[None]
  m = _matrices(size)
  back = alignment.warp_from_frame(
      alignment.warp_to_frame(jnp.asarray(img), m), m, (size, size))
  box = _face_box(size)
  err = np.abs(np.asarray(back)[0][box] - img[0][box])
  # Interpolation error of two bilinear warps of a smooth image (not
  # rounding, which is ~1e-6 here).
  assert err.max() < 0.01, err.max()
  # The whole aligned FFHQ image lands inside facer's frame.
  corners = np.array([[-0.5, -0.5], [size - 0.5, size - 0.5]], np.float32)
  c = np.asarray(alignment.apply_affine(m[0], corners))
  assert (c > 0).all() and (c < 448).all()


def test_class_map_is_in_image_coordinates():
  """A colour-thresholding 'network' run through parse_logits keeps positions."""
  s = 96
  ys, xs = np.mgrid[0:s, 0:s]
  disc = (xs - 40) ** 2 + (ys - 58) ** 2 <= 9 ** 2
  rect = (xs >= 55) & (xs <= 75) & (ys >= 30) & (ys <= 42)
  img = -np.ones((s, s, 3), np.float32)
  img[disc, 0] = 1.0
  img[rect, 2] = 1.0
  want = np.full((s, s), 3)
  want[disc], want[rect] = 0, 2

  def colour_net(crops):
    assert crops.shape[1:] == (448, 448, 3)
    # Classes: red, green, blue, dark; logits over a 512² map like the parser.
    x = ops.resize_bilinear_torch(crops, (512, 512))
    return 20.0 * jnp.concatenate([x, jnp.full_like(x[..., :1], 0.5)], -1)

  imgs = jnp.asarray(np.stack([img, img[::-1]]))
  labels = np.asarray(jnp.argmax(
      farl.parse_logits(colour_net, imgs), -1))
  assert (labels[0] == want).mean() > 0.99
  assert (labels[1] == want[::-1]).mean() > 0.99
  inner = (xs - 40) ** 2 + (ys - 58) ** 2 <= 7 ** 2
  assert (labels[0][inner] == 0).all() and (labels[1][inner[::-1]] == 0).all()


# -------------------------------------------- the Parser object on a tiny net

TINY = dict(farl.DEFAULT_CONFIG, width=32, layers=4, heads=2,
            output_indices=(0, 1, 2, 3), channels=16)


def tiny_parser(directory):
  """Writes the TINY parser with seeded weights as a converted checkpoint
  (checkpoint.save, as converters.farl does); returns its JSON config."""
  cfg = {k: list(v) if isinstance(v, tuple) else v for k, v in TINY.items()}
  net = farl.network_from_config(cfg)
  shapes = jax.eval_shape(net.init, jax.random.PRNGKey(0),
                          jnp.zeros((1, 448, 448, 3)))
  rs = np.random.RandomState(0)

  def fill(path, a):  # like the golden 'fan_in' rule (eager init is slow)
    name = jax.tree_util.keystr(path)
    n = rs.randn(*a.shape)
    if "image_std" in name or "var" in name:
      n = np.abs(n) * 0.5 + 0.5
    elif "image_mean" in name:
      n = n * 0.0 + 0.5
    elif a.ndim > 1:
      n = n / np.sqrt(np.prod(a.shape[:-1]))
    elif "scale" in name:
      n = 1.0 + 0.1 * n
    else:
      n = 0.1 * n
    return n.astype(np.float32)
  params = jax.tree_util.tree_map_with_path(fill, shapes)
  checkpoint.save(directory, params, farl.KIND, cfg)
  return cfg


def test_tiny_parser_loads_and_parses(tmp_path):
  tiny_parser(tmp_path / "farl")
  p = farl.load(tmp_path)  # a bundle holding farl/
  imgs = jax.random.uniform(jax.random.PRNGKey(2), (2, 64, 64, 3),
                            minval=-1.0, maxval=1.0)
  probs = np.asarray(p.parse(p.params, imgs))
  assert probs.shape == (2, 64, 64, 19)
  # A float32 softmax of 19 classes, then bilinear resampling (a convex
  # combination): sums within ~19 · 6e-8 ≈ 1e-6 of 1.
  np.testing.assert_allclose(probs.sum(-1), 1.0, atol=1e-5)
  lm = np.broadcast_to(alignment.ffhq_landmarks(64), (2, 5, 2))
  # The same landmarks as the default: the same program on the same
  # numbers, up to the landmark matrix's float32 rounding.
  np.testing.assert_allclose(p.parse(p.params, imgs, lm), probs, atol=1e-6)
  # Per image: swapping the batch swaps the maps.
  np.testing.assert_allclose(p.parse(p.params, imgs[::-1]), probs[::-1],
                             atol=1e-5)  # probabilities ≤ 1, as above
  assert np.abs(probs[0] - probs[1]).max() > 1e-3
  assert p.logits(p.params, jnp.zeros((1, 448, 448, 3))).shape == (
      1, 512, 512, 19)
  assert p.labels == farl.CELEBM_LABELS


def test_load_parser_refuses_other_kinds(tmp_path):
  checkpoint.save(tmp_path / "x", {"a": np.zeros(2)}, "stylegan2", {})
  with pytest.raises(checkpoint.CheckpointError, match="'farl'"):
    farl.load(tmp_path / "x")


# ------------------------------------- parity with the official network (slow)

@pytest.fixture(scope="module")
def official(golden, rule, tmp_path_factory):
  """The golden stand-in weights saved as a .pt and as TorchScript, converted."""
  manifest, arrays = golden(GOLDEN_NAME)
  sd = {k: torch.from_numpy(np.asarray(v))
        for k, v in rule.state_dict_from_manifest(manifest).items()}
  d = tmp_path_factory.mktemp("farl")
  torch.save(sd, d / "parser.pt")
  _scripted(sd).save(str(d / "parser_jit.pt"))
  del sd
  assert conv.main(["--src", str(d / "parser.pt"), "--dst", str(d / "conv")]) == 0
  assert conv.main(["--src", str(d / "parser_jit.pt"),
                    "--dst", str(d / "conv_jit")]) == 0
  return d, arrays


@pytest.mark.slow
def test_parity_with_official(official):
  d, ref = official
  p = farl.load(d / "conv")
  x = jnp.asarray(ref["input"].transpose(0, 2, 3, 1))
  with jax.default_matmul_precision("float32"):
    logits = np.asarray(p.logits(p.params, x)).transpose(0, 3, 1, 2)
    feats = jax.jit(lambda v, x: p.module.apply(
        v, x, return_features=True)[1])(p.params, x)
  assert logits.shape == (1, 19, 512, 512)
  errs = {
      "logits_pool4": rel_l2(
          logits.reshape(1, 19, 128, 4, 128, 4).mean((3, 5)),
          ref["logits_pool4"]),
      "logits_crop64": rel_l2(logits[:, :, 224:288, 224:288],
                              ref["logits_crop64"]),
  }
  for i, f in enumerate(feats):
    errs[f"fpn_feature_{i}"] = rel_l2(
        np.asarray(f).transpose(0, 3, 1, 2)[:, :8], ref[f"fpn_feature_{i}"])
  print("farl parity rel L2:", errs)
  # The forward parity level (float32 forward errors of these
  # networks are ~1e-6 relative: e.g. the StyleGAN2 image 5.8e-7 from
  # float64, bench/float_precision.py; FaRL itself was not run in float64).
  assert max(errs.values()) <= 1e-4, errs
  agree = (logits.argmax(1) == ref["labels"]).mean()
  print("farl argmax agreement:", agree)
  # Only pixels whose top two logits are within the ~1e-4 parity can flip.
  assert agree >= 0.999


@pytest.mark.slow
def test_torchscript_source_converts_like_plain(official, capsys):
  d, _ = official
  a, cfg_a = checkpoint.load(d / "conv", farl.KIND)
  b, cfg_b = checkpoint.load(d / "conv_jit", farl.KIND)
  assert jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b)
  assert all(np.array_equal(x, y) for x, y in zip(
      jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)))
  assert cfg_b["source"] == "parser_jit.pt"
  # Never overwrite silently.
  before = os.path.getmtime(d / "conv" / "config.json")
  assert conv.main(["--src", str(d / "parser.pt"), "--dst", str(d / "conv")]) == 2
  assert "already exists" in capsys.readouterr().err
  assert os.path.getmtime(d / "conv" / "config.json") == before


@pytest.mark.slow
def test_parse_with_official_network(official):
  d, _ = official
  p = farl.load(d / "conv")
  img = jax.random.uniform(jax.random.PRNGKey(0), (1, 64, 64, 3),
                           minval=-1.0, maxval=1.0)
  probs = np.asarray(p.parse(p.params, img))
  assert probs.shape == (1, 64, 64, 19)
  assert np.isfinite(probs).all()
  np.testing.assert_allclose(probs.sum(-1), 1.0, atol=1e-5)  # see above
