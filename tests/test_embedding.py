"""Optimisation-based embedding: schedule, regulariser, convergence, batching."""
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dhr_jax import embedding
from dhr_jax.models import ops


def test_learning_rate_schedule():
  # Python float64 arithmetic stored as float32: relative error ≤ 6e-8, so
  # every rtol below (≥ 1e-6) holds with ≥ 16× room.
  lrs = embedding.learning_rates(1000, lr=0.1)
  assert lrs[0] == 0.0                              # linear ramp-up from 0
  np.testing.assert_allclose(lrs[25], 0.05, rtol=1e-5)   # halfway up (t=0.025)
  np.testing.assert_allclose(lrs[50:750], 0.1, rtol=1e-6)
  np.testing.assert_allclose(lrs[875], 0.05, rtol=1e-4)  # cosine midpoint
  np.testing.assert_allclose(lrs[999], 0.1 * (0.5 - 0.5 * math.cos(
      0.004 * math.pi)), rtol=1e-4)


def test_latent_noise_schedule():
  # float64 NumPy stored as float32: relative error ≤ 6e-8 (rtol 1e-6).
  levels = embedding.noise_levels(400)
  np.testing.assert_allclose(levels[0], 0.05)
  np.testing.assert_allclose(levels[150], 0.05 * 0.25, rtol=1e-6)  # t=3/8
  assert np.all(levels[300:] == 0.0)
  assert np.all(np.diff(levels[:300]) < 0)


def test_noise_regularizer_hand_values():
  # ±1 products and means over powers of two are exact in float32, so the
  # default rtol (1e-7) is only spent on nothing.
  ones = jnp.ones((1, 16, 16, 1))
  # Lag-1 autocorrelation 1 along both axes at 16² and again at 8².
  np.testing.assert_allclose(embedding.noise_regularizer([ones]), 4.0)
  checker = jnp.asarray((-1.0) ** np.add.outer(np.arange(8), np.arange(8)))
  # Every neighbour has the opposite sign: -1 along both axes, squared.
  np.testing.assert_allclose(
      embedding.noise_regularizer([checker[None, :, :, None]]), 2.0)
  half = jnp.concatenate([jnp.ones((1, 4, 8, 1)), -jnp.ones((1, 4, 8, 1))], 1)
  # Rows: 6 of 8 neighbour pairs agree (two sign flips, circularly) → 0.5².
  np.testing.assert_allclose(embedding.noise_regularizer([half]), 1.25)


def test_normalize_noise_unbiased():
  x = np.random.RandomState(0).randn(1, 8, 8, 1).astype(np.float32) * 3 + 2
  n = np.asarray(embedding.normalize_noise(jnp.asarray(x)))
  # 64 float32 values of size ~1: sums carry ≤ 64 · 6e-8 ≈ 4e-6 relative
  # error at worst (~5e-7 typically), hence 1e-6 on the mean, 1e-5 on std.
  np.testing.assert_allclose(n.mean(), 0.0, atol=1e-6)
  np.testing.assert_allclose(n.std(ddof=1), 1.0, rtol=1e-5)


@pytest.mark.parametrize("size,to", [(1024, 256), (64, 256), (256, 64),
                                     (48, 256)])
def test_generated_image_meets_target_as_official_interpolate(size, to):
  """The DHR code's optimisation embedding (GANInverter optim_infer.py)
  clamps the generated image to [-1, 1] and resizes it to the target's size
  with F.interpolate(mode='bilinear'): align_corners=False, no antialias."""
  import torch
  x = np.random.RandomState(size).randn(2, size, size, 3).astype(np.float32)
  x *= 1.5  # a third of the values beyond ±1: the clamp matters
  got = np.asarray(ops.resize_generated(jnp.asarray(x), (to, to)))
  want = torch.nn.functional.interpolate(
      torch.clamp(torch.from_numpy(x).permute(0, 3, 1, 2), -1.0, 1.0),
      size=(to, to), mode="bilinear", align_corners=False,
      antialias=False).permute(0, 2, 3, 1).numpy()
  # Each output is a convex combination of at most four clamped inputs
  # (|v| ≤ 1) with weights from the pixel grid: a few float32 roundings of
  # at most 6e-8 each, differently ordered here and in torch. Measured on
  # these cases (1024→256, 64→256, 128→256) against torch in float64: ours
  # within 1.1e-7, torch's float32 within 1.1e-7, the two 1.2e-7 apart;
  # the bound leaves 8×.
  assert np.abs(got - want).max() <= 1e-6
  # Not an antialiased (averaging) resize: that one differs by far more.
  if size > to:
    pooled = x.clip(-1, 1).reshape(2, to, size // to, to, size // to,
                                   3).mean((2, 4))
    assert np.abs(got - pooled).max() > 0.1


def test_resize_target_is_the_pil_bilinear_resize():
  from PIL import Image
  from dhr_jax import io
  u = np.random.RandomState(0).randint(0, 256, (2, 64, 64, 3), np.uint8)
  got = io.resize_target(u / 127.5 - 1.0)
  assert got.shape == (2, 256, 256, 3) and got.dtype == np.float32
  for i in range(2):
    want = np.asarray(Image.fromarray(u[i]).resize((256, 256),
                                                   Image.BILINEAR))
    np.testing.assert_array_equal(io.to_uint8(got[i]), want)


@pytest.fixture(scope="module")
def setup():
  from dhr_jax.models import lpips
  from dhr_jax.models.stylegan2 import init_generator
  G = init_generator(jax.random.PRNGKey(0), size=16, style_dim=32, n_mlp=2,
                     channels=32)
  L = lpips.load("vgg")
  z = jax.random.normal(jax.random.PRNGKey(1), (3, 32))
  targets = G(G.params, z)
  stats = embedding.latent_stats(G, jax.random.PRNGKey(2), 2000)
  return G, L, targets, stats


def test_w_projection_converges_and_images_are_independent(setup):
  """Each image's run is the same whether it shares its batch with image 1
  or image 2 (no coupling through noise statistics or loss means), and the
  LPIPS-driven loss falls."""
  G, L, targets, stats = setup
  keys = jax.random.split(jax.random.PRNGKey(3), 3)
  steps = 16
  ab = embedding.optimize_latent(G, targets[:2], L, key=keys[:2],
                                 steps=steps, w_stats=stats)
  ac = embedding.optimize_latent(G, targets[::2], L, key=keys[::2],
                                 steps=steps, w_stats=stats)
  # Image 0's run in two batches. Equal here; against a float64 run of the
  # same 16 steps (bench/float_precision.py --part embedding): codes 4.1e-6
  # (|Δ| / (1 + |w|)), losses 2.8e-5 (relative), image 2.7e-5 (max |Δ|).
  # Bound = 4 × the two runs' errors, as in test_refine: 4e-5, 2.5e-4,
  # 2.5e-4.
  np.testing.assert_allclose(ab.codes[0], ac.codes[0], rtol=4e-5, atol=4e-5)
  np.testing.assert_allclose(ab.losses[0], ac.losses[0], rtol=2.5e-4)
  np.testing.assert_allclose(ab.image[0], ac.image[0], atol=2.5e-4)
  assert not np.allclose(ab.codes[1], ac.codes[1], atol=1e-3)

  assert ab.codes.shape == (2, G.n_latent, 32)
  # W space: one latent for every layer.
  np.testing.assert_array_equal(ab.codes[:, 0], ab.codes[:, -1])
  assert ab.image.shape == targets[:2].shape
  assert [n.shape for n in ab.noise] == [(2,) + s.shape[1:] for s in G.noise]
  for n in ab.noise:  # renormalised after every step (float32 means of ≤
    # 16² unit-scale values: ≲ 8 · 6e-8 · 4 ≈ 2e-6)
    np.testing.assert_allclose(n.mean((1, 2, 3)), 0.0, atol=1e-5)
  for r in (ab, ac):
    losses = np.asarray(r.losses)
    thirds = np.array_split(losses, 3, axis=1)
    means = np.stack([t.mean(1) for t in thirds], 1)
    print("loss thirds", means, "lpips", np.asarray(r.terms["lpips"])[:, [0, -1]])
    # Convergence (quality, not precision):
    assert np.all(np.diff(means, axis=1) < 0), means  # monotonic-ish
    assert np.all(losses[:, -1] < 0.2 * losses[:, 0])
    lp = np.asarray(r.terms["lpips"])
    assert np.all(lp[:, -1] < 0.8 * lp[:, 0])
  # The returned image is the generator's image of the returned codes/noise.
  img = G.synthesis(G.params, ab.codes[:1], noise=[n[:1] for n in ab.noise])
  # One forward pass in another program: ~6e-7 relative (bench), values ≲ 3.
  np.testing.assert_allclose(img, ab.image[:1], atol=1e-5)


@pytest.mark.slow
def test_wplus_batched_equals_per_image(setup):
  G, L, targets, stats = setup
  keys = jax.random.split(jax.random.PRNGKey(4), 2)
  both = embedding.optimize_latent(G, targets[:2], L, key=keys, steps=12,
                                   space="w+", w_stats=stats, mse_lambda=1.0)
  assert not np.allclose(both.codes[:, 0], both.codes[:, -1])
  for i in range(2):
    one = embedding.optimize_latent(G, targets[i:i + 1], L, key=keys[i:i + 1],
                                    steps=12, space="w+", w_stats=stats,
                                    mse_lambda=1.0)
    # Measured against float64 (bench/float_precision.py --part embedding):
    # losses 1.8e-5 (relative) for either program, so 4 × both → 1.5e-4;
    # 1e-3 is kept. The codes are 1.8e-6 apart here but 2.4e-2 from
    # float64: Adam moves a latent element whose gradient float32 does not
    # resolve by ±lr_t whichever sign rounding gives it, so per element
    # only Adam's own bound holds, |Δ| ≤ 2 Σ_t lr_t (= 2.0 here).
    np.testing.assert_allclose(one.losses[0], both.losses[i], rtol=1e-3)
    assert np.abs(one.codes[0] - both.codes[i]).max() <= 2 * float(
        embedding.learning_rates(12).sum())
  assert np.all(both.losses[:, -1] < both.losses[:, 0])


@pytest.mark.slow
def test_coarse_inversion_runs_40_w_steps(setup):
  G, L, targets, _ = setup
  r = embedding.coarse_inversion(G, targets[:1], L, key=jax.random.PRNGKey(5))
  assert r.losses.shape == (1, 40)  # (the 0.8 below: convergence, not precision)
  np.testing.assert_array_equal(r.codes[:, 0], r.codes[:, -1])
  assert r.terms["lpips"][0, -1] < 0.8 * r.terms["lpips"][0, 0]


def test_bad_arguments(setup):
  G, L, targets, stats = setup
  key = jax.random.PRNGKey(0)
  with pytest.raises(ValueError, match="space"):
    embedding.optimize_latent(G, targets, L, key=key, steps=2, space="z")
  with pytest.raises(ValueError, match="w_stats"):
    embedding.optimize_latent(G, targets, L, key=jax.random.split(key, 3),
                              steps=2)
  with pytest.raises(ValueError, match="NHWC"):
    embedding.optimize_latent(G, targets[0], L, key=key, steps=2)
  with pytest.raises(ValueError, match="init"):
    embedding.optimize_latent(G, targets, L, key=key, steps=2, w_stats=stats,
                              init=jnp.zeros((3, 5)))


def test_last_step_image_is_rendered_before_the_update(setup):
  """The official loop generates a step's image, computes its loss, and
  only then updates: DSS reads the last step's image from before the update
  (GANInverter optim_infer.py keeps `delta` at i == optim_step - 1), while
  the codes are the ones after it. Latent noise off and no lr ramp-up, so
  the first step already moves the codes."""
  G, L, targets, stats = setup
  noise0 = [jax.random.normal(jax.random.PRNGKey(10 + i), n.shape)
            for i, n in enumerate(G.noise)]
  kw = dict(key=jax.random.PRNGKey(6), w_stats=stats, noise=0.0,
            lr_rampup=0.0, noise_init=noise0)
  one = embedding.optimize_latent(G, targets[:1], L, steps=1, **kw)
  two = embedding.optimize_latent(G, targets[:1], L, steps=2, **kw)
  start = jnp.broadcast_to(stats[0], (1, G.n_latent, stats[0].shape[0]))
  # One forward pass each, in different programs: ~6e-7 relative (bench),
  # values ≲ 3, so 1e-5; the moved codes change the image by ≥ 1e-2.
  np.testing.assert_allclose(one.last_step_image,
                             G.synthesis(G.params, start, noise=noise0),
                             atol=1e-5)
  assert np.abs(one.codes - start).max() > 0.05  # one step of lr 0.1
  assert np.abs(one.image - one.last_step_image).max() > 1e-2
  # The two-step run's last image is the image of the codes (and noise
  # maps) after its first step, i.e. the one-step run's final image: both
  # runs take the same first step (lr 0.1 at t = 0 either way).
  np.testing.assert_allclose(two.last_step_image, one.image, atol=1e-5)
  np.testing.assert_allclose(two.image, G.synthesis(
      G.params, two.codes, noise=two.noise), atol=1e-5)
  assert np.abs(two.codes - one.codes).max() > 1e-3


def test_latent_avg_or_mean():
  from dhr_jax.models.stylegan2 import init_generator
  G = init_generator(jax.random.PRNGKey(0), size=8, style_dim=8, n_mlp=1,
                     channels=4)
  stats = (jnp.arange(8.0), 1.0)
  np.testing.assert_array_equal(embedding.latent_avg_or_mean(G, stats),
                                G.latent_avg)
  rows = jnp.stack([G.latent_avg, G.latent_avg + 2.0])
  np.testing.assert_allclose(  # mean of two rows: exact up to 1 ulp
      embedding.latent_avg_or_mean(G.replace(latent_avg=rows), stats),
      G.latent_avg + 1.0, rtol=1e-6)
  np.testing.assert_array_equal(
      embedding.latent_avg_or_mean(G.replace(latent_avg=None), stats),
      stats[0])


# Five steps of the 512-channel 64² generator with LPIPS-VGG at 128²:
# ~15 s of CPU time (minutes under load).
@pytest.mark.slow
def test_w_pivot_parity_with_official_loop(rule, golden, tmp_path):
  """PTI's W pivot (GANInverter pti_pivot.yaml, optim_infer.py) against the
  official loop run for 5 steps: tests/fixtures/pti_pivot_64.md."""
  import torch
  import dhr_jax
  from conftest import REPO, rel_l2
  from converters import stylegan2 as conv
  from dhr_jax.models import lpips
  f = np.load(os.path.join(REPO, "tests", "fixtures", "pti_pivot_64.npz"))
  manifest, _ = golden("stylegan2_64")
  sd = rule.state_dict_from_manifest(manifest)
  # The checkpoint's latent_avg travels through the converter.
  torch.save({"g_ema": {k: torch.from_numpy(v) for k, v in sd.items()},
              "latent_avg": torch.from_numpy(f["latent_avg"])},
             tmp_path / "g.pt")
  assert conv.main(["--src", str(tmp_path / "g.pt"),
                    "--dst", str(tmp_path / "ckpt")]) == 0
  G = dhr_jax.load_generator(str(tmp_path / "ckpt"))
  nhwc = lambda a: np.transpose(a, (0, 2, 3, 1))
  nchw = lambda a: np.transpose(np.asarray(a), (0, 3, 1, 2))
  steps = f["codes"].shape[0]
  stats = (np.zeros(512, np.float32), f["latent_std"])
  r = embedding.optimize_latent(
      G, nhwc(f["images_resize"]), lpips.load("vgg"),
      key=jax.random.PRNGKey(0), steps=steps, space="w", lr=5e-3,
      w_stats=stats, init=embedding.latent_avg_or_mean(G, stats)[None],
      noise_init=[nhwc(f[f"noise0_{i}"]) for i in range(len(G.noise))],
      latent_noise=f["latent_draws"][None])
  # Bounds: 4 × (the official float32 run's distance to float64 + ours),
  # both measured from the same inputs (float64: jax x64 here, torch
  # float64 there; the two float64 runs agree to 4e-8): codes rel. L2
  # 1.1e-4 + 1.1e-4, final image 1.6e-4 + 5.3e-4, last step's image
  # 1.3e-4 + 2.7e-4, lpips 5.7e-6 + 4.8e-6 and noise regulariser
  # 2.5e-7 + 2.4e-6 relative. Measured here (Xeon, 2 cores): 1.4e-4,
  # 4.6e-4, 2.0e-4, 1.1e-5, 2.6e-6.
  np.testing.assert_allclose(r.terms["lpips"][0], f["lpips"], rtol=4e-5)
  np.testing.assert_allclose(r.terms["noise"][0], f["noise_reg"], rtol=1.2e-5)
  assert rel_l2(r.codes[0, :1], f["codes"][-1]) <= 1e-3
  np.testing.assert_array_equal(r.codes[0, 0], r.codes[0, -1])  # W
  assert rel_l2(nchw(r.image), f["final_image"]) <= 3e-3
  assert rel_l2(nchw(r.last_step_image), f["last_step_image"]) <= 1.6e-3
  # Not vacuous: the start is latent_avg (the first step has lr 0), and the
  # image before the last update is 11 % (rel. L2) from the one after it.
  np.testing.assert_array_equal(f["codes"][0, 0], f["latent_avg"])
  assert rel_l2(f["last_step_image"], f["final_image"]) > 0.05


def test_coarse_inversion_reports_every_step_once(setup):
  """`progress` hears steps 1..N once each, in order, for a batch of two
  (vmapped: one callback per step, not per image), and listening changes
  no number: the compiled loop is the same but for the callback."""
  G, L, targets, stats = setup
  keys = jax.random.split(jax.random.PRNGKey(7), 2)
  heard = []
  kw = dict(key=keys, steps=3, w_stats=stats)
  loud = embedding.coarse_inversion(G, targets[:2], L, progress=heard.append,
                                    **kw)
  assert heard == [1, 2, 3]
  quiet = embedding.coarse_inversion(G, targets[:2], L, **kw)
  for a, b in ((loud.codes, quiet.codes), (loud.losses, quiet.losses),
               (loud.last_step_image, quiet.last_step_image)):
    np.testing.assert_array_equal(a, b)
  # The same program (no new compile) with another listener: each hears
  # only its own run's steps.
  again = []
  embedding.coarse_inversion(G, targets[:2], L, progress=again.append, **kw)
  assert again == [1, 2, 3] and heard == [1, 2, 3]
