"""The embedded demo: the whole DHR pipeline without downloaded weights.

    python run.py --config=configs/demo.py --workdir=/tmp/demo

A small StyleGAN2 with seeded random weights stands in for the FFHQ
generator. Its own images, each with a photograph patch pasted at a known
place (the out-of-domain part), are the inputs (written to OUT/inputs/).
The embedding is DSS's coarse W inversion itself, DSS has no parser and
thresholds each image's superpixel scores adaptively (Otsu: the stand-in's LPIPS scale is not
a face generator's), refinement is hybrid, and one edit moves the codes along
a seeded random direction. The metrics table compares the mask with the
known patch and the reconstruction inside / outside it before (embedding)
and after refinement.

On a raw photo instead (needs the `faces` extra):

    python run.py --config=configs/demo.py --config.data.input=PHOTO \
        --config.data.align=True --workdir=/tmp/demo_photo

aligns the photo's face at the stand-in's 64², inverts, refines and edits it
and pastes every result back into the photo. That shows the mechanics only:
the stand-in generator has never seen a face.

Sizes and step counts are reduced from configs/dhr.py so that the demo runs
in a few minutes on 2 CPU cores, compilation included.
"""
import os

import ml_collections

from dhr_jax.config_files import load_config


def get_config():
  # configs/dhr.py beside this file, from any working directory.
  config = load_config(os.path.join(os.path.dirname(__file__), "dhr.py"))
  config.batch_size = 1

  config.data.input = "synthetic"
  config.data.synthetic = ml_collections.ConfigDict(dict(
      count=1, seed=1, patch_fraction=1 / 3))

  config.model.checkpoint = "stand-in"
  # No face parser: the stand-in makes no faces. No warning for that here,
  # summary.json still says it is not the paper's DSS.
  config.model.parser = "none"
  config.model.stand_in = ml_collections.ConfigDict(dict(
      seed=0, size=64, style_dim=64, n_mlp=2, channels=64,
      noise_strength=0.1))

  # The embedding is DSS's 40-step coarse W inversion itself (init='coarse',
  # steps = 0): one optimisation instead of two.
  config.embedding.method = "optim"
  config.embedding.init = "coarse"
  config.embedding.steps = 0
  config.embedding.n_mean_latent = 2000

  config.dss.coarse_steps = 40
  config.dss.adaptive = True
  # At 64² the deepest LPIPS-VGG map is 4²: most superpixels have no pixel
  # there, and officially (NaN score) all of those would be out-of-domain.
  config.dss.vanished_superpixels = "own_pixels"

  # 64² generator: feature 5 is the 16² map (the paper's 128² of 1024² is
  # 1/8 of the image side; 1/4 here keeps the small patch a few cells wide).
  config.refine.feature_idx = 5
  config.refine.feature_steps = 100
  config.refine.weight_steps = 50

  config.edit.random_direction_seed = 0
  config.edit.strengths = "-2,2"

  config.save.intermediate = True
  return config
