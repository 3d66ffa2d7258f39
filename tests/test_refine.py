"""Hybrid Modulation Refinement: parity with the official DHR loop (golden
fixture through a real .pt and our converter), vmap == per-image steps, the
three modes and their degenerate masks, the LPIPS objective, save/load."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import dhr_jax
from conftest import rel_l2
from converters import stylegan2 as conv
from dhr_jax import checkpoint, editing, refine
from dhr_jax.models import ops
from dhr_jax.models.stylegan2 import feature_resolution, init_generator


def nhwc(x):
  return jnp.asarray(np.transpose(x, (0, 2, 3, 1)))


def nchw(x):
  return np.transpose(np.asarray(x), (0, 3, 1, 2))


# --------------------------------------------------------------------------
# Parity with the official loop.


@pytest.fixture(scope="module")
def g64(golden, rule, tmp_path_factory):
  manifest, _ = golden("stylegan2_64")
  tmp = tmp_path_factory.mktemp("refine_g64")
  sd = rule.state_dict_from_manifest(manifest)
  torch.save({"g_ema": {k: torch.from_numpy(v) for k, v in sd.items()}},
             tmp / "g.pt")
  assert conv.main(["--src", str(tmp / "g.pt"), "--dst", str(tmp / "ckpt")]) == 0
  return dhr_jax.load_generator(str(tmp / "ckpt")), manifest


# Six steps of the 512-channel 64² generator: ~40 s on 2 CPU cores.
@pytest.mark.slow
def test_parity_with_official_loop_64(g64, golden):
  G, g_manifest = g64
  manifest, arrays = golden("dhr_refine_64")
  meta = manifest["meta"]
  # The fixture was made with the stylegan2_64 stand-in generator.
  assert manifest["entries"] == g_manifest["entries"]
  assert meta["objective"].startswith("MSE only")
  r = refine.hybrid_refine(
      G, arrays["codes"], nhwc(arrays["target"]), nhwc(arrays["mask_full"]),
      feature_idx=meta["feature_idx"], feature_steps=meta["feature_steps"],
      weight_steps=meta["weight_steps"], weight_lr=meta["weight_lr"],
      feature_lr=meta["feature_lr"], lpips_lambda=0.0)
  assert r.losses_out.shape == (1, meta["feature_steps"])
  assert r.losses_in.shape == (1, meta["weight_steps"])
  np.testing.assert_array_equal(nchw(r.mask_feature), arrays["mask_feature"])
  # Six Adam steps of the official loop in float32 (PyTorch CPU) and ours.
  # Not measured in float64 at this size (512 channels); on the small
  # refinement (bench/float_precision.py --part refine_tiny) six steps left
  # losses 1.7e-6, offset 4.9e-6, weights 3.5e-7 from float64, so 1e-4 on
  # losses and Σθ² and 1e-3 on image and offset are ≥ 20× those.
  np.testing.assert_allclose(r.losses_out[0], meta["losses_bg"], rtol=1e-4)
  np.testing.assert_allclose(r.losses_in[0], meta["losses_face"], rtol=1e-4)
  assert rel_l2(nchw(r.image), arrays["final_image"]) <= 1e-3
  assert rel_l2(nchw(r.offset), arrays["final_offset"]) <= 1e-3
  flat = conv.flatten_official(jax.tree_util.tree_map(lambda x: x[0], r.params))
  assert set(flat) == set(meta["param_order"])
  for name, want in zip(meta["param_order"], arrays["final_param_sq_sum"]):
    got = float(np.sum(np.asarray(flat[name], np.float64) ** 2))
    assert abs(got - want) <= 1e-4 * want, (name, got, want)
  # The loop really moved the weights (the check above is not vacuous):
  before = conv.flatten_official(G.params)
  moved = [n for n in meta["param_order"]
           if not np.array_equal(flat[n], before[n])]
  assert "convs.7.conv.weight" in moved and "input.input" in moved
  assert not any(n.startswith("style.") for n in moved)


# --------------------------------------------------------------------------
# Small generators for everything else.


def tiny_problem(size=16, channels=16, batch=3):
  """A 16² stand-in generator and a batch of codes, targets and masks
  (public: bench/float_precision.py --part refine_tiny measures it)."""
  G = init_generator(jax.random.PRNGKey(0), size=size, style_dim=16, n_mlp=1,
                     channels=channels)
  b = batch
  k1, k2, k3 = jax.random.split(jax.random.PRNGKey(1), 3)
  codes = jax.random.normal(k1, (b, G.n_latent, 16))
  target = jnp.tanh(jax.random.normal(k2, (b, size, size, 3)))
  mask = (jax.random.uniform(k3, (b, size, size, 1)) > 0.4).astype(jnp.float32)
  return G, codes, target, mask


@pytest.fixture(scope="module")
def tiny():
  return tiny_problem()


K = 3  # feature_idx on the 16² generator: the 8² feature


def _run(tiny, **kw):
  G, codes, target, mask = tiny
  args = dict(feature_idx=K, feature_steps=6, weight_steps=3, weight_lr=1e-2,
              lpips_lambda=0.0)
  args.update(kw)
  return refine.hybrid_refine(G, codes, target, mask, **args)


def test_batched_equals_looped_single_image_steps(tiny):
  G, codes, target, mask = tiny
  r = _run(tiny)
  spec = refine.refine_spec(G, K, "hybrid")
  frozen = dataclasses.replace(spec, weights_frozen=True)
  hyper = refine.make_hyper(1e-2, 9e-2, 1.0, 0.0)
  res = feature_resolution(K)
  render = jax.jit(lambda p, c, o, m: G.synthesis(
      {"synthesis": p}, c, feature_idx=K, offset=o, mask=m))
  for i in range(codes.shape[0]):
    inputs = refine.RefineInputs(
        codes[i:i + 1], target[i:i + 1], mask[i:i + 1],
        refine.area_pool(mask[i:i + 1], res), list(G.noise))
    state = refine.init_state(spec, G.params["synthesis"], inputs.codes,
                              inputs.noise)
    losses, snapshots = [], []
    for t in range(6):  # the public jitted step, one Python call per step
      state, (l_in, l_out) = refine.hybrid_step(
          state, inputs, hyper, spec=spec if t < 3 else frozen)
      losses.append((float(l_in), float(l_out)))
      snapshots.append(state)
    l_in, l_out = np.asarray(losses).T
    # Two float32 programs of the same six Adam steps. Each against a
    # float64 run (bench/float_precision.py --part refine_tiny; worst
    # image): losses 1.7e-6, offset 4.9e-6, weights 3.5e-7 (relative L2),
    # image 1.5e-5 (max |Δ|). Bound = 4 × the sum of both programs' errors
    # (another CPU's float32 error may be a few times ours, cf.
    # test_stylegan2): losses 2e-5, offset 4e-5, weights 1e-5 (≥ 2.8e-6),
    # image 1.5e-4. (Here the two are much closer: 2e-7 to 1.4e-6.)
    assert rel_l2(r.losses_in[i], l_in[:3]) <= 2e-5
    assert rel_l2(r.losses_out[i], l_out) <= 2e-5
    assert rel_l2(r.offset[i], state.offset[0]) <= 4e-5
    for a, b in zip(jax.tree_util.tree_leaves(r.params["synthesis"]),
                    jax.tree_util.tree_leaves(state.params)):
      assert rel_l2(a[i], b) <= 1e-5
    image = render(state.params, inputs.codes, state.offset,
                   inputs.mask_feature)
    assert float(jnp.max(jnp.abs(image[0] - r.image[i]))) <= 1.5e-4
    # Weights and their Adam state stop exactly at weight_steps.
    for t in (3, 4):
      for a, b in zip(jax.tree_util.tree_leaves(
          (snapshots[2].params, snapshots[2].opt_params)),
                      jax.tree_util.tree_leaves(
          (snapshots[t].params, snapshots[t].opt_params))):
        np.testing.assert_array_equal(a, b)
    assert not np.array_equal(snapshots[1].params["conv1"]["conv"]["weight"],
                              snapshots[2].params["conv1"]["conv"]["weight"])
  # Each image got its own weights.
  w = r.params["synthesis"]["conv1"]["conv"]["weight"]
  assert float(jnp.max(jnp.abs(w[0] - w[1]))) > 1e-4
  np.testing.assert_array_equal(r.params["mapping"]["style_1"]["weight"][2],
                                G.params["mapping"]["style_1"]["weight"])


def test_one_program_per_shapes_and_config(tiny):
  _run(tiny)
  n = refine.compiled_refinement._cache_size()
  # Learning rates and loss weights are traced.
  r = _run(tiny, weight_lr=3e-3, feature_lr=0.05, l2_lambda=2.0)
  assert refine.compiled_refinement._cache_size() == n
  assert r.losses_in.shape == (3, 3) and r.losses_out.shape == (3, 6)
  # Another generator of the same architecture reuses the program too.
  G, codes, target, mask = tiny
  other = init_generator(jax.random.PRNGKey(7), size=16, style_dim=16,
                         n_mlp=1, channels=16)
  refine.hybrid_refine(other, codes, target, mask, feature_idx=K,
                       feature_steps=6, weight_steps=3, lpips_lambda=0.0)
  assert refine.compiled_refinement._cache_size() == n


def _own_feature(G, codes):
  return jax.jit(lambda p, c: G.synthesis(p, c, feature_idx=K,
                                          return_feature=True)[1])(G.params,
                                                                   codes)


def test_weight_mode_moves_only_weights(tiny):
  G, codes, target, _ = tiny
  r = _run(tiny, mode="weight")
  assert r.mode == "weight"
  np.testing.assert_array_equal(r.mask_feature, 1.0)
  # The untouched start: one forward pass to the 8² feature in two programs
  # (equal here; one pass is ~6e-7 from float64 even at 64², 512 channels).
  assert rel_l2(r.offset, _own_feature(G, codes)) <= 1e-6
  np.testing.assert_array_equal(r.losses_out, 0.0)
  assert bool(jnp.all(r.losses_in[:, -1] < r.losses_in[:, 0]))
  w = r.params["synthesis"]["convs_1"]["conv"]["weight"][0]
  assert float(jnp.max(jnp.abs(w - G.params["synthesis"]["convs_1"]["conv"]
                                 ["weight"]))) > 1e-3
  # The offset is never seen: any offset renders the same image.
  item = r[0]
  other = item.replace(offset=item.offset + 3.0)
  np.testing.assert_array_equal(editing.render(G, item),
                                editing.render(G, other))
  # The same result as PTI-style refinement on the full mask in hybrid mode.
  h = refine.hybrid_refine(G, codes, target, jnp.ones_like(target[..., :1]),
                           feature_idx=K, feature_steps=6, weight_steps=3,
                           weight_lr=1e-2, lpips_lambda=0.0)
  np.testing.assert_array_equal(h.offset, r.offset)
  # The same arithmetic in two programs (0 apart here); were they to round
  # differently, by the weights' error (≤ 3.5e-7 from float64, see above)
  # carried through one forward pass.
  assert rel_l2(h.image, r.image) <= 1e-5


def test_feature_mode_leaves_weights_untouched(tiny):
  G, codes, target, _ = tiny
  r = _run(tiny, mode="feature")
  for a, b in zip(jax.tree_util.tree_leaves(r.params),
                  jax.tree_util.tree_leaves(G.params)):
    for i in range(codes.shape[0]):
      np.testing.assert_array_equal(a[i], b)
  np.testing.assert_array_equal(r.mask_feature, 0.0)
  np.testing.assert_array_equal(r.losses_in, 0.0)
  assert bool(jnp.all(r.losses_out[:, -1] < r.losses_out[:, 0]))
  assert float(jnp.max(jnp.abs(r.offset - _own_feature(G, codes)))) > 1e-2
  # Hybrid mode with an all-out-of-domain mask: the empty in-domain mean is
  # 0 with a 0 gradient, so Adam leaves every weight bit-identical.
  h = refine.hybrid_refine(G, codes, target, jnp.zeros_like(target[..., :1]),
                           feature_idx=K, feature_steps=6, weight_steps=3,
                           weight_lr=1e-2, lpips_lambda=0.0)
  assert bool(jnp.all(jnp.isfinite(h.losses_out)))
  np.testing.assert_array_equal(h.losses_in, 0.0)
  for a, b in zip(jax.tree_util.tree_leaves(h.params["synthesis"]),
                  jax.tree_util.tree_leaves(G.params["synthesis"])):
    np.testing.assert_array_equal(a[1], b)
  # Two programs of six offset steps (4.5e-7 apart here); each ≤ 4.9e-6
  # from float64 (refine_tiny, above): 4 × the sum → 4e-5.
  assert rel_l2(h.offset, r.offset) <= 4e-5


def test_masked_mean_and_torch_nearest():
  x = jnp.arange(12.0).reshape(1, 2, 2, 3)
  m = jnp.asarray([[1.0, 0.0], [0.0, 1.0]]).reshape(1, 2, 2, 1)
  # Channels summed, pixels counted once: (0+1+2 + 9+10+11) / 2.
  assert float(refine.masked_mean(x, m)) == 16.5
  zero = jnp.zeros_like(m)
  assert float(refine.masked_mean(x, zero)) == 0.0
  g = jax.grad(lambda x: refine.masked_mean(x ** 2, zero))(x)
  np.testing.assert_array_equal(g, 0.0)
  for n_in, n_out in [(16, 15), (16, 7), (16, 3), (16, 1), (8, 13), (32, 7),
                      (128, 63), (128, 31), (64, 15), (4, 12)]:
    a = np.random.RandomState(n_in * n_out).rand(1, 1, n_in, n_in).astype(
        np.float32)
    want = torch.nn.functional.interpolate(torch.from_numpy(a),
                                           size=(n_out, n_out)).numpy()
    got = ops.resize_nearest(nhwc(a), (n_out, n_out))
    np.testing.assert_array_equal(nchw(got), want, err_msg=(n_in, n_out))
  # The same rule on the first two axes of a numpy label map (DSS resizes
  # superpixel labels and LPIPS maps with it), non-square sizes included.
  labels = np.random.RandomState(0).randint(1, 200, (64, 48))
  for size in [(31, 23), (15, 11), (7, 48), (128, 97), (3, 1)]:
    want = torch.nn.functional.interpolate(
        torch.from_numpy(labels[None, None].astype(np.float32)),
        size=size).numpy()[0, 0]
    got = ops.resize_nearest(labels, size, axes=(0, 1))
    assert isinstance(got, np.ndarray) and got.dtype == labels.dtype
    np.testing.assert_array_equal(got, want, err_msg=size)


def test_lpips_objective_matches_its_definition():
  from dhr_jax.models import lpips
  G, codes, target, mask = tiny_problem(size=32, channels=16)
  alex = lpips.load("alex")
  k = 5  # 16² feature of the 32² generator
  r = refine.hybrid_refine(G, codes, target, mask, feature_idx=k,
                           feature_steps=2, weight_steps=2, lpips_lambda=0.5,
                           l2_lambda=2.0, lpips_alex=alex)
  # Step 0 renders the generator's own image (offset = own feature).
  img = jax.jit(G.synthesis)(G.params, codes)
  maps = jax.jit(alex.spatial)(alex.params, img, target)
  m_f = nchw(r.mask_feature)
  want_in, want_out = [], []
  for i in range(codes.shape[0]):
    p_in = p_out = 0.0
    for d in maps:
      d = nchw(d)[i:i + 1]
      m = torch.nn.functional.interpolate(
          torch.from_numpy(np.array(m_f[i:i + 1])), size=d.shape[2:]).numpy()
      p_in += (d * m).sum() / m.sum()
      p_out += (d * (1 - m)).sum() / (1 - m).sum()
    se = nchw((img[i:i + 1] - target[i:i + 1]) ** 2)
    mf = nchw(mask[i:i + 1])
    want_in.append(0.5 * p_in + 2.0 * (se * mf).sum() / mf.sum())
    want_out.append(0.5 * p_out + 2.0 * (se * (1 - mf)).sum() / (1 - mf).sum())
  # Step 0's losses (one forward pass, LPIPS maps summed) by the loop and
  # by NumPy/torch here: float32 sums of ≤ 32² terms, ~1e-6 relative.
  np.testing.assert_allclose(r.losses_in[:, 0], want_in, rtol=1e-5)
  np.testing.assert_allclose(r.losses_out[:, 0], want_out, rtol=1e-5)
  np.testing.assert_allclose(nchw(r.mask_feature),
                             nchw(refine.area_pool(mask, 16)), rtol=0)
  assert bool(jnp.all(r.losses_out[:, 1] < r.losses_out[:, 0]))


def test_lpips_lambda_zero_needs_no_lpips_weights(tiny, monkeypatch):
  from dhr_jax.models import lpips

  def refuse(*a, **k):
    raise AssertionError("LPIPS weights were loaded")
  monkeypatch.setattr(lpips, "load", refuse)
  r = _run(tiny)
  assert bool(jnp.all(jnp.isfinite(r.image)))
  with pytest.raises(AssertionError, match="LPIPS weights"):
    _run(tiny, lpips_lambda=1.0)


def test_bad_inputs_are_refused(tiny):
  G, codes, target, mask = tiny
  run = lambda c=codes, t=target, m=mask, **kw: refine.hybrid_refine(
      G, c, t, m, feature_idx=K, feature_steps=2, weight_steps=1,
      lpips_lambda=0.0, **kw)
  with pytest.raises(ValueError, match=r"codes must be W\+ \(B, 6, 16\)"):
    run(c=codes[:, :5])
  with pytest.raises(ValueError, match=r"target must be .*\(3, 16, 16, 3\)"):
    run(t=jnp.zeros((3, 32, 32, 3)))
  with pytest.raises(ValueError, match=r"target must be"):
    run(t=target[:2])
  with pytest.raises(ValueError, match=r"mask must be .*\(3, 16, 16, 1\)"):
    run(m=mask[..., 0])
  with pytest.raises(ValueError, match="needs a mask"):
    run(m=None)
  with pytest.raises(ValueError, match="mode must be one of"):
    run(mode="pti")
  with pytest.raises(ValueError, match="feature_idx must be in"):
    refine.hybrid_refine(G, codes, target, mask, feature_idx=11,
                         feature_steps=2, weight_steps=1, lpips_lambda=0.0)
  with pytest.raises(ValueError, match="weight_steps"):
    refine.hybrid_refine(G, codes, target, mask, feature_idx=K,
                         feature_steps=2, weight_steps=3, lpips_lambda=0.0)
  with pytest.raises(ValueError, match="noise must be"):
    run(noise=G.noise[:-1])


# --------------------------------------------------------------------------
# Saving and loading.


def test_split_delta_is_bit_exact():
  base = np.asarray([1.0, 7e-4, 1e-3, -0.0, 0.5, 3e-8], np.float32)
  refined = np.asarray([1e-10, -8e-4, 1e-3 - 1.5e-3 * 7, 0.0, 0.5 + 1e-7,
                        -2.9e-3], np.float32)
  delta, fix = refine.split_delta(refined, base)
  assert fix is not None and 0 in fix["index"]  # 1 → 1e-10 loses the value
  out = refine.apply_delta(base, delta, fix)
  np.testing.assert_array_equal(out.view(np.uint32), refined.view(np.uint32))


def test_save_load_renders_identical_image(tiny, tmp_path):
  G, codes, target, mask = tiny
  noise = G.make_noise(jax.random.PRNGKey(9))
  for own_noise in (True, False):
    r = _run(tiny, noise=None if own_noise else noise)
    d = tmp_path / f"refined_{own_noise}"
    refine.save_refined(d, r, G, 1)
    got = refine.load_refined(d, G)
    want = r[1]
    for a, b in zip(jax.tree_util.tree_leaves(want.params),
                    jax.tree_util.tree_leaves(got.params)):
      np.testing.assert_array_equal(a, b)
    for f in ("codes", "offset", "mask_feature"):
      np.testing.assert_array_equal(getattr(got, f), getattr(want, f))
      assert getattr(got, f).shape[0] == 1
    assert got.feature_idx == K and got.mode == "hybrid"
    a = np.asarray(editing.render(G, want))
    b = np.asarray(editing.render(G, got))
    assert a.tobytes() == b.tobytes()
    # The loop's final render vs this program's: one forward pass (~1e-6).
    assert float(jnp.max(jnp.abs(b[0] - r.image[1]))) <= 1e-5
    if not own_noise:
      assert not np.array_equal(a, np.asarray(editing.render(
          G, got.replace(noise=list(G.noise)))))
  # Not over another generator's weights, nor over an existing directory.
  other = init_generator(jax.random.PRNGKey(5), size=16, style_dim=16,
                         n_mlp=1, channels=16)
  with pytest.raises(checkpoint.CheckpointError, match="other generator"):
    refine.load_refined(tmp_path / "refined_True", other)
  with pytest.raises(checkpoint.CheckpointError, match="already exists"):
    refine.save_refined(tmp_path / "refined_True", r, G, 0)
  # A state saved before the generator config recorded z_dim and
  # layer_features (both style_dim then) loads on today's generator.
  from dhr_jax.models.frozen import freeze
  old = G.replace(config=freeze({k: v for k, v in G.config.items()
                                 if k not in ("z_dim", "layer_features")}))
  refine.save_refined(tmp_path / "old_config", r, old, 0)
  np.testing.assert_array_equal(
      refine.load_refined(tmp_path / "old_config", G).offset, r[0].offset)


def test_map_path_close_to_float64():
  """The CPU path (refine.map_images: lax.map, one image after another)
  against the same loop in float64, batch 1 and 4, full objective."""
  from dhr_jax.models import lpips
  G, codes, target, mask = tiny_problem(size=32, channels=16, batch=4)
  alex = lpips.load("alex")
  k = 5  # 16² feature of the 32² generator
  run = lambda sl: refine.hybrid_refine(
      G, codes[sl], target[sl], mask[sl], feature_idx=k, feature_steps=6,
      weight_steps=3, lpips_alex=alex)
  r1, r4 = run(slice(0, 1)), run(slice(0, 4))
  f64 = lambda t: jax.tree_util.tree_map(
      lambda x: jnp.asarray(x, jnp.float64), t)
  with jax.enable_x64(True):
    spec = refine.refine_spec(G, k, "hybrid", alex.net)
    _, offset, _, image, _, _ = refine.compiled_refinement(
        spec, 6, 3, f64(G.params["synthesis"]), f64(codes), f64(target),
        f64(mask), f64(list(G.noise)), f64(alex.params),
        f64(refine.make_hyper()))
    offset, image = np.asarray(offset), np.asarray(image)
  # Measured on this case (2 cores, float32 against this float64 run):
  # through lax.map 4.2e-6 to 6.8e-6 (image) and 4.5e-6 to 9.7e-6
  # (offset) at batch 1 and 4; through vmap the same (4.2e-6 to 7.0e-6,
  # 4.5e-6 to 9.7e-6). Six Adam steps amplify one rounding (the first
  # update is ~lr·sign(g); bench/float_precision.py --part refine_map), so
  # another CPU's float32 may land a few times further: bound 5e-5, ≥ 5×
  # the worst measured.
  for r in (r1, r4):
    for i in range(len(r)):
      assert rel_l2(r.image[i], image[i]) <= 5e-5
      assert rel_l2(r.offset[i], offset[i]) <= 5e-5
  # (Image 0 alone and in the batch of 4 differ by rounding here, up to
  # 9.5e-7: the one-image map compiles differently, its loop of one trip
  # is removed; at 64² they were equal bit for bit.)
