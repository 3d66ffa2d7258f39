"""NVIDIA stylegan2-ada-pytorch pickles: the real .pkl of the golden fixtures
converts without NVIDIA's code (and without torch), equals NVIDIA's outputs,
and works downstream; pickles that would run code are refused without
running it."""
import collections
import copy
import os
import pickle
import pickletools
import re
import shlex
import struct
import subprocess
import sys
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import dhr_jax
from conftest import GOLDEN, REPO, rel_l2
from converters import nvidia_pickle
from converters import stylegan2 as conv
from converters import stylegan2_ada
from converters.common import ConversionError
from dhr_jax import editing, refine
from dhr_jax.models.stylegan2 import Generator

PKL = os.path.join(GOLDEN, "stylegan2_ada_64.pkl")
# Made with NVIDIA's code (tests/fixtures/stylegan2_ada_zw_32.txt says how):
# z 128 → hidden 96 → w 64, 32², NVIDIA's outputs in the .npz.
ZW = os.path.join(REPO, "tests", "fixtures", "stylegan2_ada_zw_32")


def nchw(x):
  return np.transpose(np.asarray(x), (0, 3, 1, 2))


# Conversion in a fresh interpreter where importing NVIDIA's packages, or
# torch, fails: the .pkl path needs neither.
_NO_NVIDIA = """
import sys
for name in ("torch", "torch_utils", "dnnlib", "training", "legacy"):
  sys.modules[name] = None
from converters import stylegan2
sys.exit(stylegan2.main(sys.argv[1:]))
"""


def _convert_without_nvidia(pkl, tmp):
  run = subprocess.run(
      [sys.executable, "-c", _NO_NVIDIA, "--src", pkl, "--dst",
       str(tmp / "ckpt")], cwd=REPO, capture_output=True, text=True)
  assert run.returncode == 0, run.stderr
  return dhr_jax.load_generator(str(tmp / "ckpt"))


@pytest.fixture(scope="module")
def ada(golden, tmp_path_factory):
  manifest, arrays = golden("stylegan2_ada_64")
  tmp = tmp_path_factory.mktemp("ada")
  return _convert_without_nvidia(PKL, tmp), manifest, arrays, tmp


def test_config_from_the_pickle(ada, rule):
  G, manifest, _, _ = ada
  c = G.config
  assert (c["size"], c["style_dim"], c["n_mlp"], c["n_latent"]) == (64, 256, 8, 10)
  assert c["channels"] == {"4": 256, "8": 256, "16": 128, "32": 64, "64": 32}
  assert c["conv_clamp"] == 4.0 and c["lr_mlp"] == 0.01
  assert c["z_dim"] == c["layer_features"] == 256 and G.z_dim == 256
  nv = rule.state_dict_from_manifest(manifest)
  np.testing.assert_array_equal(G.latent_avg, nv["mapping.w_avg"])
  np.testing.assert_array_equal(G.params["synthesis"]["input"]["input"][0],
                                nv["synthesis.b4.const"])
  np.testing.assert_array_equal(G.noise[3][0, :, :, 0],
                                nv["synthesis.b16.conv0.noise_const"])


def test_tensors_read_bit_exact(rule, golden):
  manifest, _ = golden("stylegan2_ada_64")
  data = nvidia_pickle.load(PKL)
  got = nvidia_pickle.state_dict(data["G_ema"])
  want = rule.state_dict_from_manifest(manifest)
  assert set(got) == set(want)
  for k, v in want.items():
    assert got[k].dtype == np.float32 and got[k].shape == v.shape, k
    np.testing.assert_array_equal(got[k], v, err_msg=k)
  assert data["training_set_kwargs"] == {"resolution": 64}
  assert data["augment_pipe"] is None


# The fixture's own float32 error, measured: our model evaluated in float64
# differs from it by ≤ 3.6e-7 relative (w 5.9e-8, images 2.2e-7..3.6e-7);
# our float32 evaluation by ≤ 5.1e-7. 1e-4 leaves a wide margin for other
# CPUs' float32 while any mapping mistake (e.g. dropping the clamp: 8e-2,
# see below) is far outside it.
TOL = 1e-4


def _check_parity(G, a):
  """Every output of an NVIDIA fixture (the golden file's layout), ≤ TOL."""
  z = jnp.asarray(a["z"])
  w = G.mapping(G.params, z)
  ws = jnp.repeat(w[:, None], G.n_latent, axis=1)
  assert rel_l2(ws, a["ws_from_z"]) <= TOL
  # Truncation through the public API, with latent_avg = the file's w_avg.
  w_t = dhr_jax.truncate(w, 0.7, G.latent_avg)
  assert rel_l2(jnp.repeat(w_t[:, None], G.n_latent, axis=1),
                a["ws_trunc07"]) <= TOL
  assert rel_l2(nchw(G(G.params, z)), a["image_from_z"]) <= TOL
  ws_in = jnp.asarray(a["ws_in"])
  assert rel_l2(nchw(G.synthesis(G.params, ws_in)), a["image_from_ws"]) <= TOL
  off = [jnp.zeros_like(n) for n in G.noise]
  assert rel_l2(nchw(G.synthesis(G.params, ws_in, off)),
                a["image_nonoise"]) <= TOL


def test_parity_with_nvidia(ada):
  G, _, a, _ = ada
  _check_parity(G, a)
  ws_in = jnp.asarray(a["ws_in"])
  # The fixture exercises the clamp: without it the image is far off
  # (measured: 8.0e-2).
  unclamped = Generator({**G.config, "conv_clamp": None}, G.params, G.noise)
  assert rel_l2(nchw(unclamped.synthesis(G.params, ws_in)),
                a["image_from_ws"]) > 1e-2


# --------------------------------------------------------------------------
# z_dim ≠ w_dim (and a hidden mapping width of its own): NVIDIA's
# MappingNetwork sizes fc0 z_dim → layer_features, the last layer → w_dim.


@pytest.fixture(scope="module")
def ada_zw(rule, tmp_path_factory):
  manifest, arrays = rule.load_golden(ZW + ".npz")
  tmp = tmp_path_factory.mktemp("ada_zw")
  return (_convert_without_nvidia(ZW + ".pkl", tmp), manifest, arrays, tmp)


def test_zw_widths_from_the_pickle(ada_zw, rule):
  G, manifest, _, _ = ada_zw
  c = G.config
  assert (c["z_dim"], c["layer_features"], c["style_dim"]) == (128, 96, 64)
  assert (c["size"], c["n_mlp"], c["n_latent"], c["conv_clamp"]) == (
      32, 3, 8, 256.0)
  assert c["channels"] == {"4": 32, "8": 32, "16": 32, "32": 16}
  m = G.params["mapping"]
  assert [m[f"style_{i}"]["weight"].shape for i in (1, 2, 3)] == [
      (96, 128), (96, 96), (64, 96)]
  # G_ema is what converts (the training copy G holds other values).
  data = nvidia_pickle.load(ZW + ".pkl")
  want = rule.state_dict_from_manifest(manifest)
  assert set(data) == {"training_set_kwargs", "G", "D", "G_ema",
                       "augment_pipe"}
  np.testing.assert_array_equal(m["style_1"]["weight"],
                                want["mapping.fc0.weight"])
  np.testing.assert_array_equal(G.latent_avg, want["mapping.w_avg"])
  assert not np.array_equal(
      nvidia_pickle.state_dict(data["G"])["mapping.fc0.weight"],
      want["mapping.fc0.weight"])


# The fixture's own float32 error, measured as for the golden file: our
# model in float64 differs from it by ≤ 1.7e-7 relative (w 5.3e-8, images
# 1.6e-7..1.7e-7), our float32 evaluation by ≤ 2.4e-7; TOL stands.
def test_zw_parity_with_nvidia(ada_zw):
  G, _, a, _ = ada_zw
  assert a["z"].shape == (2, 128) and a["ws_in"].shape == (2, 8, 64)
  _check_parity(G, a)
  with pytest.raises(ValueError, match=re.escape("z must be (B, 128)")):
    G.mapping(G.params, jnp.zeros((1, 64)))


def test_zw_to_torch_round_trip(ada_zw, capsys):
  """The rosinality layout holds the widths in its shapes; converting back
  restores them (rosinality's own Generator cannot load it: one width)."""
  G, _, _, tmp = ada_zw
  assert conv.main(["--to-torch", "--src", str(tmp / "ckpt"), "--dst",
                    str(tmp / "back.pt")]) == 0
  assert ("takes z_dim=128 through layer_features=96 to style_dim=64"
          in capsys.readouterr().err)
  back = torch.load(tmp / "back.pt", weights_only=True)
  assert tuple(back["g_ema"]["style.1.weight"].shape) == (96, 128)
  assert conv.main(["--src", str(tmp / "back.pt"), "--dst",
                    str(tmp / "again")]) == 0
  again = dhr_jax.load_generator(str(tmp / "again"))
  assert again.config == G.config
  for x, y in zip(jax.tree_util.tree_leaves(again.params),
                  jax.tree_util.tree_leaves(G.params)):
    np.testing.assert_array_equal(x, y)


def test_to_torch_records_conv_clamp_and_round_trips(ada, rule, capsys):
  G, manifest, _, tmp = ada
  assert conv.main(["--to-torch", "--src", str(tmp / "ckpt"), "--dst",
                    str(tmp / "back.pt")]) == 0
  assert "conv_clamp=4.0" in capsys.readouterr().err
  back = torch.load(tmp / "back.pt", weights_only=True)
  assert back["config"] == {"conv_clamp": 4.0, "lr_mlp": 0.01}
  sd = {k: v.numpy() for k, v in back["g_ema"].items()}
  # Strictly the rosinality layout of this architecture ...
  shapes = conv.expected_shapes(G.config)
  assert {k: v.shape for k, v in sd.items()} == shapes
  # ... holding NVIDIA's tensors where rosinality keeps them.
  nv = rule.state_dict_from_manifest(manifest)
  pairs = {"input.input": nv["synthesis.b4.const"][None],
           "style.1.weight": nv["mapping.fc0.weight"],
           "style.8.bias": nv["mapping.fc7.bias"],
           "conv1.conv.modulation.bias": nv["synthesis.b4.conv1.affine.bias"],
           "convs.0.conv.weight": nv["synthesis.b8.conv0.weight"][None],
           "convs.3.noise.weight": nv["synthesis.b16.conv1.noise_strength"][None],
           "convs.7.activate.bias": nv["synthesis.b64.conv1.bias"],
           "to_rgbs.3.bias": nv["synthesis.b64.torgb.bias"].reshape(1, 3, 1, 1),
           "to_rgb1.conv.weight": nv["synthesis.b4.torgb.weight"][None],
           "noises.noise_8": nv["synthesis.b64.conv1.noise_const"][None, None]}
  for k, v in pairs.items():
    np.testing.assert_array_equal(sd[k], v, err_msg=k)
  np.testing.assert_array_equal(back["latent_avg"].numpy(), nv["mapping.w_avg"])
  # Converting the .pt back restores conv_clamp: nothing silently dropped.
  assert conv.main(["--src", str(tmp / "back.pt"), "--dst",
                    str(tmp / "again")]) == 0
  again = dhr_jax.load_generator(str(tmp / "again"))
  assert again.config == G.config
  for a, b in zip(jax.tree_util.tree_leaves(again.params),
                  jax.tree_util.tree_leaves(G.params)):
    np.testing.assert_array_equal(a, b)


# ~35 s of CPU (compiling the refinement steps at 64²).
@pytest.mark.slow
def test_refine_and_edit_unchanged_downstream(ada):
  """DHR's refinement, edits and rendering take the converted generator as
  any other (the clamp lives inside the generator)."""
  G, _, a, _ = ada
  codes = jnp.asarray(a["ws_in"][:1])
  target = jnp.clip(G.synthesis(G.params, codes + 0.3), -1, 1)
  mask = jnp.zeros((1, 64, 64, 1)).at[:, 16:48, 16:48].set(1.0)
  # Learning rates for these stand-in weights, whose activations sit at the
  # small clamp (±4): DHR's defaults (tuned for trained nets) overshoot here.
  r = refine.hybrid_refine(G, codes, target, mask, feature_idx=5,
                           feature_steps=4, weight_steps=3, lpips_lambda=0.0,
                           feature_lr=3e-3, weight_lr=1e-4)
  # Measured: L_in 0.648 → 0.374 → 0.196, L_out 0.364 → 0.276 → 0.215 → 0.180.
  assert np.all(np.diff(np.asarray(r.losses_in[0])) < 0)
  assert np.all(np.diff(np.asarray(r.losses_out[0])) < 0)
  edited = editing.edit_codes(codes, jnp.ones(256), strengths=[0.0, 2.0])
  imgs = editing.render(G, r, edited)
  assert imgs.shape == (1, 2, 64, 64, 3)
  # α = 0 renders the refined inversion up to float round-off between the
  # loop's program and render's (measured max 1.2e-6); α = 2 changes it
  # (measured mean 0.83).
  np.testing.assert_allclose(imgs[:, 0], r.image, atol=1e-5)
  assert float(jnp.mean(jnp.abs(imgs[:, 1] - imgs[:, 0]))) > 1e-1


# --------------------------------------------------------------------------
# What does not map is refused, naming it.


@pytest.fixture(scope="module")
def loaded():
  return nvidia_pickle.load(PKL)


def _module(name, modules=None, **attrs):
  return nvidia_pickle.PersistentModule(name, 6, (), {}, {}, {}, modules or {},
                                        attrs)


def _conditional(g):
  g.attrs["c_dim"] = 10


def _resnet(g):
  g.modules["synthesis"].modules["b16"].attrs["architecture"] = "resnet"


def _stylegan3(g):
  # StyleGAN3's synthesis: an 'input' (Fourier features) and layers L0_...
  g.modules["synthesis"].modules = {"input": _module("SynthesisInput"),
                                    "L0_36_256": _module("SynthesisLayer")}


def _mixed_lr(g):
  g.modules["mapping"].modules["fc3"].attrs["bias_gain"] = 0.1


def _grey(g):
  g.attrs["img_channels"] = 1


def _no_z(g):
  g.attrs["z_dim"] = 0


def _box_filter(g):
  conv0 = g.modules["synthesis"].modules["b8"].modules["conv0"]
  conv0.buffers["resample_filter"] = np.ones((4, 4), np.float32) / 16


@pytest.mark.parametrize("change,expect", [
    (_conditional, "conditional generator (c_dim=10)"),
    (_resnet, "synthesis.b16 has architecture='resnet'; only 'skip'"),
    (_stylegan3, "a StyleGAN3 generator (synthesis.input + L*_ layers): a "
     "different, alias-free architecture"),
    (_mixed_lr, "the mapping lr_multiplier differs between layers"),
    (_grey, "img_channels=1; only RGB generators convert"),
    (_no_z, "z_dim=0: a generator without a latent input"),
    (_box_filter, "synthesis.b8.conv0.resample_filter is not the [1,3,3,1] "
     "filter"),
])
def test_refuses_what_does_not_map(loaded, change, expect):
  data = copy.deepcopy(loaded)
  change(data["G_ema"])
  with pytest.raises(ConversionError, match=re.escape(expect)):
    stylegan2_ada.read_g_ema(data, "x.pkl")


def test_fp16_blocks_are_named_and_run_in_float32(loaded, capsys):
  data = copy.deepcopy(loaded)
  for r in (32, 64):
    data["G_ema"].modules["synthesis"].modules[f"b{r}"].attrs["use_fp16"] = True
  sd, _, arch = stylegan2_ada.read_g_ema(data, "x.pkl")
  assert "blocks b32, b64 ran in fp16" in capsys.readouterr().err
  assert sd["convs.7.conv.weight"].dtype == np.float32
  assert arch == {"conv_clamp": 4.0, "lr_mlp": 0.01}


def test_pickles_and_torch_files_told_apart(tmp_path):
  sd = {"style.1.weight": torch.zeros(2)}
  torch.save(sd, tmp_path / "zip.pt")
  torch.save(sd, tmp_path / "legacy.pt", _use_new_zipfile_serialization=False)
  assert not nvidia_pickle.is_pickle(str(tmp_path / "zip.pt"))
  assert not nvidia_pickle.is_pickle(str(tmp_path / "legacy.pt"))
  assert not nvidia_pickle.is_pickle(str(tmp_path / "missing.pkl"))
  assert nvidia_pickle.is_pickle(PKL)


def test_refuses_a_pickle_without_g_ema(tmp_path):
  with open(tmp_path / "d.pkl", "wb") as f:
    pickle.dump({"D": 1}, f)
  with pytest.raises(ConversionError, match=r"no 'G_ema' in the pickle \(found \['D'\]\)"):
    stylegan2_ada.read_pickle(str(tmp_path / "d.pkl"))


# --------------------------------------------------------------------------
# Nothing in a pickle runs. The malicious pickles are built here, opcode by
# opcode; each is first shown to run its payload under plain pickle.loads
# (so the test would notice a payload that never worked).


def _str(s):
  b = s.encode()
  return b"X" + struct.pack("<I", len(b)) + b  # BINUNICODE


def _call(module, name, *args):
  """GLOBAL module.name applied (REDUCE) to the MARK...TUPLE of args."""
  return b"c" + f"{module}\n{name}\n".encode() + b"(" + b"".join(args) + b"tR"


def _g_ema_file(obj):
  return b"\x80\x02}" + _str("G_ema") + obj + b"s."  # {'G_ema': obj}


def _cli_refuses(path, tmp_path, capsys, expect):
  assert conv.main(["--src", str(path), "--dst", str(tmp_path / "out")]) == 2
  err = capsys.readouterr().err
  assert err.startswith("error: ") and err.count("\n") == 1, err
  assert expect in err and "nothing in the file was executed" in err
  assert not os.path.exists(tmp_path / "out")


@pytest.mark.parametrize("module,name,payload", [
    ("os", "system", "touch {}"),
    ("builtins", "exec", "open({!r}, 'w').close()"),
])
def test_global_payload_is_refused_and_never_runs(tmp_path, capsys, module,
                                                  name, payload):
  marker = tmp_path / "pwned"
  arg = payload.format(shlex.quote(str(marker)) if name == "system"
                       else str(marker))
  data = _g_ema_file(_call(module, name, _str(arg)))
  pickle.loads(data)  # the control: a plain unpickler runs it
  assert marker.exists()
  marker.unlink()
  (tmp_path / "evil.pkl").write_bytes(data)
  _cli_refuses(tmp_path / "evil.pkl", tmp_path, capsys,
               f"refused global {module}.{name}")
  assert not marker.exists()


def _persistence_pickle(module_src, state):
  """{'G_ema': torch_utils.persistence._reconstruct_persistent_obj(meta)}."""
  meta = {"type": "class", "version": 6, "module_src": module_src,
          "class_name": "Generator", "state": state}
  body = pickle.dumps(meta, protocol=2)[2:-1]  # no PROTO, no STOP
  return _g_ema_file(b"ctorch_utils.persistence\n_reconstruct_persistent_obj\n"
                     + body + b"\x85R")


def test_module_src_payload_never_runs(tmp_path, capsys, monkeypatch):
  marker = tmp_path / "pwned"
  src = f"open({str(marker)!r}, 'w').close()\nclass Generator:\n  pass\n"
  data = _persistence_pickle(src, {"_modules": {}, "z_dim": 8})

  # The control: NVIDIA's loader imports module_src as a module (here a
  # stand-in that does the same), which runs the payload.
  def reconstruct(meta):
    module = types.ModuleType("_module_src")
    exec(meta["module_src"], module.__dict__)  # what persistence does
    return module.__dict__[meta["class_name"]]()
  fake = types.ModuleType("torch_utils.persistence")
  fake._reconstruct_persistent_obj = reconstruct
  monkeypatch.setitem(sys.modules, "torch_utils", types.ModuleType("torch_utils"))
  monkeypatch.setitem(sys.modules, "torch_utils.persistence", fake)
  pickle.loads(data)
  assert marker.exists()
  marker.unlink()
  monkeypatch.undo()

  # Ours reads the module as data (module_src unread) and refuses it: it is
  # no StyleGAN2 generator.
  (tmp_path / "evil.pkl").write_bytes(data)
  g = nvidia_pickle.load(str(tmp_path / "evil.pkl"))["G_ema"]
  assert g.class_name == "Generator" and g.attrs == {"z_dim": 8}
  assert not hasattr(g, "module_src")
  assert conv.main(["--src", str(tmp_path / "evil.pkl"), "--dst",
                    str(tmp_path / "out")]) == 2
  assert "G_ema.synthesis is missing" in capsys.readouterr().err
  assert not marker.exists()


def test_module_src_of_the_real_file_is_never_read(tmp_path, rule, golden):
  """The real pickle with its class source replaced by a payload reads the
  same weights, and the payload does not run."""
  marker = tmp_path / "pwned"
  raw = open(PKL, "rb").read()
  ops = list(pickletools.genops(raw))
  assert ops[1][0].name == "FRAME"
  _, frame_len, frame_pos = ops[1]
  src_ops = [(a, p) for o, a, p in ops if o.name == "BINUNICODE"
             and "class SynthesisLayer" in a]
  assert len(src_ops) == 1  # one string, memoised for every module
  src, pos = src_ops[0]
  new = f"open({str(marker)!r}, 'w').close()\n"
  old_len, new_len = 5 + len(src.encode()), 5 + len(new.encode())
  assert pos < frame_pos + 9 + frame_len  # inside the first frame
  patched = (raw[:frame_pos + 1]
             + struct.pack("<Q", frame_len - old_len + new_len)
             + raw[frame_pos + 9:pos] + _str(new) + raw[pos + old_len:])
  (tmp_path / "patched.pkl").write_bytes(patched)
  data = nvidia_pickle.load(str(tmp_path / "patched.pkl"))
  manifest, _ = golden("stylegan2_ada_64")
  want = rule.state_dict_from_manifest(manifest)
  got = nvidia_pickle.state_dict(data["G_ema"])
  for k in ("synthesis.b64.torgb.weight", "mapping.w_avg"):
    np.testing.assert_array_equal(got[k], want[k])
  assert not marker.exists()


def _storage_bytes(values):
  """A float32 storage in torch's legacy torch.save format (what
  torch.storage._load_from_bytes reads)."""
  head = b"".join(pickle.dumps(x, protocol=2) for x in (
      0x1950A86A20F9469CFC6C, 1001, {"protocol_version": 1001,
                                     "little_endian": True}))
  record = (b"\x80\x02(" + _str("storage") + b"ctorch\nFloatStorage\n"
            + _str("k0") + _str("cpu") + b"J" + struct.pack("<i", len(values))
            + b"NtQ.")  # BINPERSID of the record tuple
  return (head + record + pickle.dumps(["k0"], protocol=2)
          + struct.pack("<q", len(values))
          + np.asarray(values, "<f4").tobytes())


def _tensor_file(offset, size, stride):
  ints = lambda t: b"(" + b"".join(b"J" + struct.pack("<i", i) for i in t) + b"t"
  blob = _storage_bytes([0.0, 1.0, 2.0, 3.0])
  storage = _call("torch.storage", "_load_from_bytes",
                  b"B" + struct.pack("<I", len(blob)) + blob)
  return _g_ema_file(_call("torch._utils", "_rebuild_tensor_v2", storage,
                           b"J" + struct.pack("<i", offset), ints(size),
                           ints(stride), b"\x89}"))


@pytest.mark.parametrize("offset,size,stride,want", [
    (0, (4,), (1,), [0.0, 1.0, 2.0, 3.0]),
    (1, (2, 2), (1, 1), [[1.0, 2.0], [2.0, 3.0]]),
    (3, (2,), (1,), None),       # past the end
    (0, (2, 2), (1, 3), None),   # stride past the end
    (0, (2,), (-1,), None),
    (0, (8,), (0,), None),       # more elements than the storage holds
])
def test_tensor_views_stay_inside_their_storage(tmp_path, offset, size,
                                                stride, want):
  (tmp_path / "t.pkl").write_bytes(_tensor_file(offset, size, stride))
  if want is None:
    with pytest.raises(nvidia_pickle.RefusedPickle, match="tensor"):
      nvidia_pickle.load(str(tmp_path / "t.pkl"))
  else:
    got = nvidia_pickle.load(str(tmp_path / "t.pkl"))["G_ema"]
    np.testing.assert_array_equal(got, np.asarray(want, np.float32))


@pytest.mark.parametrize("data,expect", [
    (b"\x80\x02" + _str("x") + b"Q.", "persistent id x"),
    (_g_ema_file(_call("torch._utils", "_rebuild_tensor_v2",
                       _call("torch.storage", "_load_from_bytes",
                             b"C\x04abcd"), b"K\x00(K\x01t(K\x01t\x89}")),
     "tensor bytes that are not a torch storage"),
    (_g_ema_file(_call("numpy", "dtype", _str("O"), b"\x89\x88")),
     "numpy.dtype('O'): only numeric dtypes"),
    (_g_ema_file(_call("torch_utils.persistence", "_reconstruct_persistent_obj",
                       b"}" + _str("type") + _str("module") + b"s")),
     "persistent object of type 'module'"),
])
def test_refuses_other_constructs(tmp_path, data, expect):
  (tmp_path / "x.pkl").write_bytes(data)
  with pytest.raises(nvidia_pickle.RefusedPickle, match=re.escape(expect)):
    nvidia_pickle.load(str(tmp_path / "x.pkl"))


def test_harmless_containers_become_plain(tmp_path, monkeypatch):
  """dnnlib.util.EasyDict (training_set_kwargs, init kwargs of real files),
  OrderedDict, sets (a REDUCE of builtins.set before protocol 4) and numpy
  scalars, as Python 3.7-era and current pickles write them."""
  class EasyDict(dict):  # NVIDIA's: a dict with attribute access
    def __getattr__(self, name):
      try:
        return self[name]
      except KeyError:
        raise AttributeError(name)

    def __setattr__(self, name, value):
      self[name] = value

  EasyDict.__module__, EasyDict.__qualname__ = "dnnlib.util", "EasyDict"
  dnnlib = types.ModuleType("dnnlib")
  dnnlib.util = types.ModuleType("dnnlib.util")
  dnnlib.util.EasyDict = EasyDict
  monkeypatch.setitem(sys.modules, "dnnlib", dnnlib)
  monkeypatch.setitem(sys.modules, "dnnlib.util", dnnlib.util)
  obj = {"training_set_kwargs": EasyDict(path="x.zip", resolution=64,
                                         nested=EasyDict(a=1)),
         "hooks": collections.OrderedDict(a=1), "names": {"w_avg"},
         "gain": np.float64(0.0625), "half": np.float16(1.5)}
  for protocol in (2, 3, 4):
    (tmp_path / "c.pkl").write_bytes(pickle.dumps(obj, protocol=protocol))
    got = nvidia_pickle.load(str(tmp_path / "c.pkl"))
    assert got == {"training_set_kwargs": {"path": "x.zip", "resolution": 64,
                                           "nested": {"a": 1}},
                   "hooks": {"a": 1}, "names": {"w_avg"}, "gain": 0.0625,
                   "half": 1.5}
    tk = got["training_set_kwargs"]
    assert type(tk) is dict and type(tk["nested"]) is dict
    assert type(got["hooks"]) is dict and type(got["gain"]) is float
