"""The README's "Library API" section runs as written.

Its snippets are executed in order, in a temporary working directory that
holds what they read: a small stand-in generator converted by
converters.stylegan2 into `ckpt/e4e_ffhq/generator`, the tiny FaRL parser
of test_farl in `ckpt/farl`, a face image and a direction file. The e4e
encoder is the one stand-in: IR-SE50 has fixed widths (its converted
weights are ~1 GB), so `load_encoder` returns an object with `encode`'s
contract instead; the real encoder is checked against the official one in
test_e4e.
"""
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from PIL import Image

import dhr_jax
from conftest import REPO
from converters import stylegan2 as conv
from dhr_jax import editing, io
from dhr_jax.models import e4e, encoders
from dhr_jax.models.stylegan2 import init_generator
from test_farl import tiny_parser


def library_snippets():
  """The ```python blocks of the README's "## Library API" section."""
  with open(os.path.join(REPO, "README.md")) as f:
    text = f.read()
  section = text.split("## Library API", 1)[1].split("\n## ", 1)[0]
  return re.findall(r"```python\n(.*?)```", section, re.S)


class StandInEncoder:
  """`E.encode(params, images, add_latent_avg=True)`: W+ codes from the
  images' mean colour, plus latent_avg."""

  def __init__(self, G, key):
    self.params = jax.random.normal(key, (3, G.n_latent, G.config["style_dim"]))
    self.latent_avg = jnp.broadcast_to(G.latent_avg,
                                       (G.n_latent, G.config["style_dim"]))

  def encode(self, params, images, add_latent_avg=True):
    codes = jnp.einsum("bc,cld->bld", jnp.mean(images, axis=(1, 2)), params)
    return codes + self.latent_avg if add_latent_avg else codes


@pytest.fixture
def workdir(tmp_path, monkeypatch):
  G = init_generator(jax.random.PRNGKey(0), size=64, style_dim=32, n_mlp=2,
                     channels=16)
  sd = conv.to_torch_state_dict(G.params, G.noise)
  torch.save({"g_ema": {k: torch.from_numpy(np.array(v)) for k, v in sd.items()},
              "latent_avg": torch.from_numpy(np.array(G.latent_avg))},
             tmp_path / "g.pt")
  assert conv.main(["--src", str(tmp_path / "g.pt"), "--dst",
                    str(tmp_path / "ckpt" / "e4e_ffhq" / "generator")]) == 0
  tiny_parser(tmp_path / "ckpt" / "farl")
  face = np.asarray(jax.jit(G.synthesis)(G.params, jnp.broadcast_to(
      G.latent_avg, (1, G.n_latent, 32))))[0]
  Image.fromarray(io.to_uint8(face)).save(tmp_path / "face.png")
  np.save(tmp_path / "smile.npy",
          np.random.RandomState(0).randn(1, 32).astype(np.float32))
  encoder = StandInEncoder(G, jax.random.PRNGKey(1))

  def load_encoder(path, arch=None):
    assert os.path.isdir(path), path
    return encoder
  # dhr_jax.load_encoder is encoders'; the runner calls e4e's.
  monkeypatch.setattr(e4e, "load", load_encoder)
  monkeypatch.setattr(encoders, "load", load_encoder)
  monkeypatch.chdir(tmp_path)
  return tmp_path


# The snippet refines for the default 100 steps and runs DSS's 40-step
# coarse inversion: 102 s of CPU time (4.4 min wall on 2 loaded cores).
@pytest.mark.slow
def test_library_api_snippets_run(workdir):
  snippets = library_snippets()
  assert snippets, "no python block in the README's Library API section"
  ns = {}
  for code in snippets:
    exec(compile(code, "README.md (Library API)", "exec"), ns)
  G, r = ns["G"], ns["r"]
  size = G.config["size"]
  assert isinstance(G, dhr_jax.Generator) and isinstance(r, dhr_jax.Refinement)
  assert ns["img"].shape == (1, size, size, 3)
  assert r.feature_idx == ns["k"] == 3 and r.mode == "hybrid"
  assert ns["out"].shape == (1, 2, size, size, 3)
  assert ns["seg"].mask.shape == (1, size, size, 1)
  # The saved and reloaded image renders exactly as the in-memory one.
  np.testing.assert_array_equal(ns["again"], editing.render(G, r[0]))
  assert bool(jnp.all(jnp.isfinite(ns["out"])))
