"""Editing: InterFaceGAN / GANSpace code edits, their loaders, and rendering
with refined (per-image) params, offset and mask, on a tiny generator."""
import argparse
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from dhr_jax import directions as directions_lib
from dhr_jax import editing
from dhr_jax import edits as edits_lib
from dhr_jax import refine
from dhr_jax.editing import EditError
from dhr_jax.models.stylegan2 import feature_resolution, init_generator

DIRECTIONS = os.path.join(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))), os.pardir,
    "shared", "directions")
K = 2  # hooked feature of the 8² generator: the 8² map entering convs_1


@pytest.fixture(scope="module")
def setup():
  """Tiny generator, two images each with its own refined copy of the
  weights, its own noise, offset and in-domain mask."""
  G = init_generator(jax.random.PRNGKey(0), size=8, style_dim=32, n_mlp=2,
                     channels=16)
  # numpy draws: eager jax ops would compile one by one (slow on a busy CPU)
  rng = np.random.RandomState(1)
  normal = lambda *shape: rng.randn(*shape).astype(np.float32)
  b, res = 2, feature_resolution(K)
  chans = G.config["channels"][str(res)]
  params = jax.tree_util.tree_map(
      lambda x: np.stack([np.asarray(x), np.asarray(x) + 0.1 * np.std(x) *
                          normal(*x.shape)]), G.params)
  codes = np.asarray(G.latent_avg) + 0.5 * normal(b, G.n_latent,
                                                  G.config["style_dim"])
  noise = [normal(b, *n.shape[1:]) for n in G.noise]
  offset = normal(b, res, res, chans)
  mask = (rng.rand(b, res, res, 1) > 0.4).astype(np.float32)
  direction = normal(G.config["style_dim"])
  direction /= np.linalg.norm(direction)
  return dict(G=G, params=params, codes=codes, noise=noise, offset=offset,
              mask=mask, direction=direction)


def _image_by_image(G, params, codes, noise, offset, mask):
  """Reference: the generator called once per image (and per edit)."""
  out = []
  for i in range(codes.shape[0]):
    p = jax.tree_util.tree_map(lambda x: x[i], params)
    n = [x[i:i + 1] for x in noise]
    row = []
    for s in range(codes.shape[1]):
      kw = {}
      if offset is not None:
        kw = dict(feature_idx=K, offset=offset[i:i + 1],
                  mask=None if mask is None else mask[i:i + 1])
      row.append(G.synthesis(p, codes[i, s][None], n, **kw)[0])
    out.append(jnp.stack(row))
  return np.asarray(jnp.stack(out))


STRENGTHS, LAYERS = [0.0, 3.0], (1, 3)  # shared so tests reuse compilations


def _refinement(s, mode="dhr", params=None, noise=None):
  """The setup as a Refinement: per-image weights, offset, mask and noise;
  'weight_only' has no offset (plain synthesis with the refined weights)."""
  params = s["params"] if params is None else params
  return refine.Refinement(
      synthesis=params["synthesis"], mapping=s["G"].params["mapping"],
      codes=s["codes"],
      offset=None if mode == "weight_only" else s["offset"],
      mask_feature=s["mask"] if mode == "dhr" else None,
      noise=s["noise"] if noise is None else noise, feature_idx=K,
      mode={"dhr": "hybrid", "feature_only": "feature",
            "weight_only": "weight"}[mode])


def _stacked(G):
  """G's params copied for each of the two images."""
  return jax.tree_util.tree_map(lambda x: np.stack([x, x]), G.params)


def test_alpha_zero_reproduces_inversion(setup):
  s = setup
  edited = editing.edit_codes(s["codes"], s["direction"], STRENGTHS, LAYERS)
  assert edited.shape == (2, 2) + s["codes"].shape[1:]
  np.testing.assert_array_equal(edited[:, 0], s["codes"])
  r = _refinement(s)
  images = editing.render(s["G"], r, edited)
  inversion = editing.render(s["G"], r)  # the refinement's own codes
  assert images.shape == (2, 2, 8, 8, 3) and inversion.shape == (2, 8, 8, 3)
  # bit for bit, although rendered in calls with 2 and 1 codes per image
  np.testing.assert_array_equal(images[:, 0], inversion)
  assert float(jnp.abs(images[:, 1] - inversion).max()) > 1e-2


@pytest.mark.parametrize("mode", ["dhr", "feature_only", "weight_only"])
def test_render_per_image_params_equals_image_by_image(setup, mode):
  s = setup
  edited = editing.edit_codes(s["codes"], s["direction"], STRENGTHS, LAYERS)
  r = _refinement(s, mode)
  images = editing.render(s["G"], r, edited)
  ref = _image_by_image(s["G"], s["params"], edited, s["noise"], r.offset,
                        r.mask_feature)
  # Batched and image-by-image renders are two float32 programs; one
  # generator forward pass is ~6e-7 (relative) from float64 (bench/
  # float_precision.py), i.e. ≲ 2e-6 on values ≲ 3: 2e-5 leaves 5×.
  np.testing.assert_allclose(images, ref, atol=2e-5, rtol=0)
  if mode == "dhr":  # each image used its own weights, not the shared ones
    shared = editing.render(s["G"], _refinement(s, mode, _stacked(s["G"])),
                            edited)
    assert float(jnp.abs(shared[1] - images[1]).max()) > 1e-2


def test_render_shared_noise(setup):
  s = setup
  G = s["G"]
  edited = editing.edit_codes(s["codes"], s["direction"], STRENGTHS, LAYERS)
  stacked = _stacked(G)
  images = editing.render(G, _refinement(s, params=stacked,
                                         noise=list(G.noise)), edited)
  noise = [jnp.concatenate([n, n]) for n in G.noise]
  ref = _image_by_image(G, stacked, edited, noise, s["offset"], s["mask"])
  np.testing.assert_allclose(images, ref, atol=2e-5, rtol=0)  # as above


def test_render_mask_polarity(setup):
  """mask 1 = in domain: the generator's own feature, the offset unused;
  mask 0: the offset replaces it."""
  s = setup
  edited = editing.edit_codes(s["codes"], s["direction"], STRENGTHS, LAYERS)
  plain = editing.render(s["G"], _refinement(s, "weight_only"), edited)
  for fill, same in ((1.0, True), (0.0, False)):
    r = _refinement(s).replace(mask_feature=np.full_like(s["mask"], fill))
    images = editing.render(s["G"], r, edited)
    diff = float(jnp.abs(images - plain).max())
    # Same numbers through two programs (≲ 2e-6, as above) vs. a real change.
    assert diff < 1e-5 if same else diff > 1e-1, (fill, diff)


def test_refinement_take_is_one_image(setup):
  s = setup
  r = _refinement(s)
  both = editing.render(s["G"], r)
  one = r[1]
  assert len(one) == 1 and one.feature_idx == K and one.mode == "hybrid"
  np.testing.assert_array_equal(one.offset, s["offset"][1:])
  np.testing.assert_allclose(editing.render(s["G"], one)[0], both[1],
                             atol=2e-5, rtol=0)
  with pytest.raises(IndexError):
    r.take(2)


def test_edits_linear_in_alpha():
  rng = np.random.RandomState(1)
  codes = jnp.asarray(rng.randn(3, 8, 16), jnp.float32)
  for n in (rng.randn(16), rng.randn(8, 16), rng.randn(1, 8, 16)):
    n = n.astype(np.float32)
    alphas = np.array([-3.0, -0.5, 0.0, 1.0, 2.5], np.float32)
    edited = np.asarray(editing.edit_codes(codes, n, alphas))
    step = np.broadcast_to(n.reshape(-1, 16), (8, 16))
    want = np.asarray(codes)[:, None] + alphas[None, :, None, None] * step
    # w + α·n: two float32 roundings of values ≲ 10 (≤ 1e-6 apart).
    np.testing.assert_allclose(edited, want, rtol=1e-6, atol=1e-6)
    # additive in α: e(1) + e(1.5) − w = e(2.5)
    one, one_half = np.asarray(editing.edit_codes(codes, n, [1.0, 1.5]))[
        :, [0, 1]].transpose(1, 0, 2, 3)
    # Three more float32 additions on values ≲ 10: a few 5e-7 roundings.
    np.testing.assert_allclose(one + one_half - np.asarray(codes),
                               edited[:, 4], rtol=1e-5, atol=1e-5)
  # a scalar strength gives S = 1
  assert editing.edit_codes(codes, n, 2.0).shape == (3, 1, 8, 16)


@pytest.mark.parametrize("layers,touched", [
    ((2, 5), [2, 3, 4]),
    ([0, 3, 7], [0, 3, 7]),
    (range(6, 8), [6, 7]),
    (slice(1, None, 3), [1, 4, 7]),
    (None, list(range(8))),
])
def test_layer_edits_touch_only_those_layers(layers, touched):
  rng = np.random.RandomState(2)
  codes = jnp.asarray(rng.randn(2, 8, 16), jnp.float32)
  n = rng.randn(8, 16).astype(np.float32)  # per-layer direction
  edited = np.asarray(editing.edit_codes(codes, n, [-2.0, 3.0], layers))
  other = [l for l in range(8) if l not in touched]
  np.testing.assert_array_equal(
      edited[:, :, other], np.broadcast_to(np.asarray(codes)[:, None][:, :, other],
                                           edited[:, :, other].shape))
  for j, alpha in enumerate([-2.0, 3.0]):  # w + α·n: as above
    np.testing.assert_allclose(edited[:, j, touched],
                               np.asarray(codes)[:, touched] + alpha * n[touched],
                               rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("layers", [(3, 3), (0, 9), (-1, 2), (1, 2, 3), [8],
                                    [], [1.5]])
def test_bad_layers_are_refused(layers):
  codes = jnp.zeros((1, 8, 4))
  with pytest.raises(EditError, match="layer"):
    editing.edit_codes(codes, np.ones(4), [1.0], layers)


def _orthonormal_pcs(k=5, d=16, seed=3):
  rng = np.random.RandomState(seed)
  q, _ = np.linalg.qr(rng.randn(d, k))
  return directions_lib.PrincipalComponents(
      components=q.T.astype(np.float32),
      std=np.array([3.0, 2.0, 1.5, 1.0, 0.5], np.float32)[:k],
      mean=rng.randn(d).astype(np.float32))


def test_ganspace_known_component_moves_codes_as_specified():
  pcs = _orthonormal_pcs()
  rng = np.random.RandomState(4)
  codes = jnp.asarray(rng.randn(2, 8, 16), jnp.float32)
  out = np.asarray(editing.ganspace_edit(
      codes, pcs, [(2, 3, 6, 1.5), [(2, 3, 6, 1.5), (4, 0, 2, -2.0)]]))
  assert out.shape == (2, 2, 8, 16)
  c = np.asarray(codes)
  v, sd = pcs.components, pcs.std
  want = c.copy()
  want[:, 3:6] += 1.5 * sd[2] * v[2]
  # w + α·σ·v in float32: two roundings of values ≲ 5.
  np.testing.assert_allclose(out[:, 0], want, rtol=1e-6, atol=1e-6)
  np.testing.assert_array_equal(out[:, 0, :3], c[:, :3])
  np.testing.assert_array_equal(out[:, 0, 6:], c[:, 6:])
  # in PCA coordinates (units of σ): component 2 moved by 1.5, others stay
  coords = lambda x: (x - pcs.mean) @ v.T / sd
  moved = coords(out[:, 0, 3:6]) - coords(c[:, 3:6])
  # Projections (16-term float32 dot products of values ≲ 5) divided by
  # σ ≥ 0.5: ≲ 16 · 5 · 6e-8 / 0.5 ≈ 1e-5 at worst, typically 1e-6.
  np.testing.assert_allclose(moved, np.broadcast_to([0, 0, 1.5, 0, 0],
                                                    moved.shape), atol=1e-5)
  # a group is the sum of its edits, each from the input codes
  want[:, 0:2] += -2.0 * sd[4] * v[4]
  np.testing.assert_allclose(out[:, 1], want, rtol=1e-6, atol=1e-6)  # as above


def test_ganspace_set_mode_puts_coordinate_at_strength():
  pcs = _orthonormal_pcs()
  rng = np.random.RandomState(5)
  w = rng.randn(3, 1, 16).astype(np.float32)
  codes = jnp.asarray(np.repeat(w, 8, axis=1))  # W codes: all layers equal
  out = np.asarray(editing.ganspace_edit(codes, pcs, [(1, 2, 4, -2.5)],
                                         mode="set"))[:, 0]
  coords = (out - pcs.mean) @ pcs.components.T / pcs.std  # (B, L, K)
  # Projections as in the test above: ≲ 1e-5 at worst.
  np.testing.assert_allclose(coords[:, 2:4, 1], -2.5, atol=1e-5)
  before = (np.asarray(codes) - pcs.mean) @ pcs.components.T / pcs.std
  np.testing.assert_allclose(coords[:, 2:4, [0, 2, 3, 4]],
                             before[:, 2:4, [0, 2, 3, 4]], atol=1e-5)
  np.testing.assert_array_equal(out[:, :2], np.asarray(codes)[:, :2])
  with pytest.raises(EditError, match="mean"):
    editing.ganspace_edit(codes, directions_lib.PrincipalComponents(
        pcs.components, pcs.std), [(1, 2, 4, 1.0)], mode="set")


def test_ganspace_file_layouts_agree(tmp_path):
  """GANSpace's npz (lat_*, singleton axes) and e4e's .pt dict (comp, mean,
  std) load to the same components and the same edits."""
  pcs = _orthonormal_pcs()
  np.savez(tmp_path / "ganspace.npz", lat_comp=pcs.components[:, None],
           lat_mean=pcs.mean[None], lat_stdev=pcs.std,
           act_comp=np.zeros((5, 1, 16), np.float32))
  torch.save({"comp": torch.from_numpy(pcs.components[:, None]),
              "mean": torch.from_numpy(pcs.mean[None, None]),
              "std": torch.from_numpy(pcs.std)}, tmp_path / "pca.pt")
  np.savez(tmp_path / "plain.npz", components=pcs.components, std=pcs.std)
  a = directions_lib.load_ganspace(tmp_path / "ganspace.npz")
  b = directions_lib.load_ganspace(str(tmp_path / "pca.pt"))
  c = directions_lib.load_ganspace(tmp_path / "plain.npz")
  for x in (a, b, c):
    np.testing.assert_array_equal(x.components, pcs.components)
    np.testing.assert_array_equal(x.std, pcs.std)
  np.testing.assert_array_equal(a.mean, pcs.mean)
  np.testing.assert_array_equal(b.mean, pcs.mean)
  assert c.mean is None
  codes = jnp.asarray(np.random.RandomState(6).randn(2, 8, 16), jnp.float32)
  edits = [(0, 0, 4, 2.0), (3, 5, 8, -1.0)]
  np.testing.assert_array_equal(
      editing.ganspace_edit(codes, tmp_path / "ganspace.npz", edits),
      editing.ganspace_edit(codes, str(tmp_path / "pca.pt"), edits))


@pytest.mark.parametrize("name,shape", [("age", (512,)), ("smile", (512,)),
                                        ("pose", (18, 512))])
def test_direction_pt_and_npy_give_same_edit(tmp_path, name, shape):
  pt = os.path.join(DIRECTIONS, name + ".pt")
  n_pt = directions_lib.load_direction(pt)
  assert n_pt.shape == shape and n_pt.dtype == np.float32
  # InterFaceGAN normals are unit vectors (per layer for pose)
  # Stored float32 unit vectors of 512 elements: norm within ~√512 · 6e-8.
  np.testing.assert_allclose(np.linalg.norm(n_pt, axis=-1), 1.0, rtol=1e-5)
  raw = torch.load(pt, map_location="cpu", weights_only=True).numpy()
  np.save(tmp_path / (name + ".npy"), raw)
  n_npy = directions_lib.load_direction(tmp_path / (name + ".npy"))
  np.testing.assert_array_equal(n_npy, n_pt)
  codes = jnp.asarray(np.random.RandomState(7).randn(2, 18, 512), jnp.float32)
  np.testing.assert_array_equal(
      editing.edit_codes(codes, pt, [-3.0, 0.0, 3.0], layers=(0, 8)),
      editing.edit_codes(codes, str(tmp_path / (name + ".npy")),
                         [-3.0, 0.0, 3.0], layers=(0, 8)))


def test_bad_direction_files_give_clear_errors(tmp_path, monkeypatch):
  (tmp_path / "junk.pt").write_text("not a tensor")
  with pytest.raises(EditError,
                     match=r"junk\.pt.*not a tensor file this reads"):
    directions_lib.load_direction(tmp_path / "junk.pt")
  # A file naming a Python object is refused without PyTorch's advice to
  # load it with weights_only=False (which would run code from the file).
  torch.save({"direction": argparse.Namespace()}, tmp_path / "obj.pt")
  with pytest.raises(EditError) as refused:
    directions_lib.load_direction(tmp_path / "obj.pt")
  assert str(refused.value) == (
      f"{tmp_path / 'obj.pt'}: not a tensor file this reads (it stores the "
      "Python object argparse.Namespace, not only tensors and plain "
      "containers; such objects are never unpickled here). Pass the file as "
      "distributed, or save the array as .npy/.npz.")
  np.save(tmp_path / "cube.npy", np.ones((2, 3, 4, 5), np.float32))
  with pytest.raises(EditError, match=r"cube\.npy.*\(2, 3, 4, 5\)"):
    directions_lib.load_direction(tmp_path / "cube.npy")
  np.save(tmp_path / "zero.npy", np.zeros((1, 8), np.float32))
  with pytest.raises(EditError, match=r"zero\.npy.*all zeros"):
    directions_lib.load_direction(tmp_path / "zero.npy")
  np.save(tmp_path / "nan.npy", np.array([1.0, np.nan], np.float32))
  with pytest.raises(EditError, match=r"nan\.npy.*NaN"):
    directions_lib.load_direction(tmp_path / "nan.npy")
  np.save(tmp_path / "obj.npy", np.array({"a": 1}, dtype=object),
          allow_pickle=True)
  with pytest.raises(EditError, match=r"obj\.npy.*pickled"):
    directions_lib.load_direction(tmp_path / "obj.npy")
  torch.save({"w": torch.ones(1, 8)}, tmp_path / "dict.pt")
  with pytest.raises(EditError, match=r"dict\.pt.*dict.*'w'"):
    directions_lib.load_direction(tmp_path / "dict.pt")
  (tmp_path / "d.txt").write_text("1 2 3")
  with pytest.raises(EditError, match=r"d\.txt.*unknown direction format"):
    directions_lib.load_direction(tmp_path / "d.txt")
  with pytest.raises(EditError, match=r"missing\.npy: no such direction"):
    directions_lib.load_direction(tmp_path / "missing.npy")
  # a real direction that does not fit the generator names both shapes
  with pytest.raises(EditError, match=r"\(18, 512\).*\(B, 8, 64\)"):
    editing.edit_codes(jnp.zeros((1, 8, 64)),
                       os.path.join(DIRECTIONS, "pose.pt"), [1.0])
  # without PyTorch, a .pt says how to get it
  monkeypatch.setitem(sys.modules, "torch", None)
  with pytest.raises(EditError, match=r"age\.pt.*pip install -e '\.\[convert\]'"):
    directions_lib.load_direction(os.path.join(DIRECTIONS, "age.pt"))


def test_bad_ganspace_files_give_clear_errors(tmp_path):
  np.savez(tmp_path / "nostd.npz", lat_comp=np.eye(4, dtype=np.float32),
           lat_mean=np.zeros(4, np.float32), var_ratio=np.ones(4))
  with pytest.raises(EditError, match=r"nostd\.npz has no std.*lat_comp, "
                     r"lat_mean, var_ratio"):
    directions_lib.load_ganspace(tmp_path / "nostd.npz")
  np.savez(tmp_path / "short.npz", comp=np.eye(4, dtype=np.float32),
           std=np.ones(3, np.float32))
  with pytest.raises(EditError, match=r"short\.npz: std must be \(4,\)"):
    directions_lib.load_ganspace(tmp_path / "short.npz")
  np.save(tmp_path / "comp.npy", np.eye(4, dtype=np.float32))
  with pytest.raises(EditError, match=r"comp\.npy.*np\.savez"):
    directions_lib.load_ganspace(tmp_path / "comp.npy")
  torch.save(torch.eye(4), tmp_path / "t.pt")
  with pytest.raises(EditError, match=r"t\.pt holds a Tensor"):
    directions_lib.load_ganspace(tmp_path / "t.pt")
  pcs = _orthonormal_pcs()
  with pytest.raises(EditError, match="component 5 out of range"):
    editing.ganspace_edit(jnp.zeros((1, 8, 16)), pcs, [(5, 0, 1, 1.0)])
  with pytest.raises(EditError, match="dimension 16, codes 4"):
    editing.ganspace_edit(jnp.zeros((1, 8, 4)), pcs, [(0, 0, 1, 1.0)])
  with pytest.raises(EditError, match="component, first, last, strength"):
    editing.ganspace_edit(jnp.zeros((1, 8, 16)), pcs, [(0, 0, 1)])


def test_render_refuses_mismatched_inputs(setup):
  s = setup
  G, codes, r = s["G"], s["codes"], _refinement(s)
  with pytest.raises(EditError, match="mask_feature needs an offset"):
    editing.render(G, _refinement(s, "weight_only").replace(
        mask_feature=s["mask"]))
  with pytest.raises(EditError, match=r"offset must be \(B=2, 8, 8, C\)"):
    editing.render(G, r.replace(offset=s["offset"][:, :4]))
  with pytest.raises(EditError, match=r"feature_idx must be in \[0, 3\)"):
    editing.render(G, r.replace(feature_idx=11))
  with pytest.raises(EditError, match=r"feature_idx must be in .* got None"):
    editing.render(G, r.replace(feature_idx=None))
  with pytest.raises(EditError, match="leading axis of 3"):
    editing.render(G, r, jnp.concatenate([codes, codes[:1]]))
  with pytest.raises(EditError, match="noise maps"):
    editing.render(G, r.replace(
        noise=[jnp.concatenate([n] * 3) for n in G.noise]))


def test_parse_helpers():
  assert edits_lib.parse_strengths("-3, 0,2.5") == [-3.0, 0.0, 2.5]
  assert edits_lib.parse_layers("all") is None and edits_lib.parse_layers("") is None
  assert edits_lib.parse_layers("4:8") == (4, 8)
  assert edits_lib.parse_layers("0,2,5") == [0, 2, 5]
  assert edits_lib.parse_ganspace_edits("54,7,8,20; 46,4,5,-20") == [
      (54, 7, 8, 20.0), (46, 4, 5, -20.0)]
  assert edits_lib.parse_ganspace_edits("1,0,2,1+2,3,4,-1") == [
      [(1, 0, 2, 1.0), (2, 3, 4, -1.0)]]
  for bad, fn in [("a,b", edits_lib.parse_strengths),
                  ("1:x", edits_lib.parse_layers),
                  ("54,7,8", edits_lib.parse_ganspace_edits)]:
    with pytest.raises(EditError):
      fn(bad)
