"""PTI (pivotal tuning, Roich et al. 2022) as the DHR paper ran it: GANInverter's
`configs/pti/pti.yaml` setting, in this framework.

    python run.py --config=configs/pti.py --config.data.input=DIR --workdir=OUT

Only the generator weights are tuned (refine.mode='weight': no feature
offset, no mask), for 350 Adam steps at lr 3e-4, on LPIPS-Alex (spatial
mean) + MSE as a per-element mean (F.mse_loss; refine.mse_norm='element',
not DHR's masked per-pixel mean), both with weight 1 and no locality
regulariser (GANInverter's default). The pivot is PTI's own W pivot, as
GANInverter's `pti_pivot.yaml` finds it: a fresh optimisation in W from the
generator's latent_avg, 450 steps at lr 5e-3 (the projector's ramps, latent
noise 0.05 decaying over 3/4 of the run, noise maps optimised with the 1e5
regulariser), LPIPS-VGG only, on the 256² resized input. For the e4e codes
as the pivot instead ("PTI (e4e pivot)") pass --config.embedding.method=e4e.

Everything else (checkpoints, data, edits, outputs) is configs/dhr.py's.
"""
import os

from dhr_jax.config_files import load_config


def get_config():
  # configs/dhr.py beside this file, from any working directory.
  config = load_config(os.path.join(os.path.dirname(__file__), "dhr.py"))
  config.embedding.update(dict(
      method="optim",
      init="latent_avg",
      space="w",
      steps=450,
      lr=5e-3,
      mse_lambda=0.0,
  ))
  config.refine.update(dict(
      mode="weight",
      # Weights move at every step; feature_steps is the total step count.
      feature_steps=350,
      weight_steps=350,
      weight_lr=3e-4,
      l2_lambda=1.0,
      lpips_lambda=1.0,
      mse_norm="element",
  ))
  return config
