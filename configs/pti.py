"""PTI (pivotal tuning, Roich et al. 2022) as the DHR paper ran it: GANInverter's
`configs/pti/pti.yaml` setting, in this framework.

    python run.py --config=configs/pti.py --config.data.input=DIR --workdir=OUT

Only the generator weights are tuned (refine.mode='weight': no feature
offset, no mask), for 350 Adam steps at lr 3e-4, on LPIPS-Alex (spatial
mean) + MSE as a per-element mean (F.mse_loss; refine.mse_norm='element',
not DHR's masked per-pixel mean), both with weight 1 and no locality
regulariser (GANInverter's default). The pivot is the e4e inversion; for
PTI's own W pivot from optimisation (GANInverter's `pti_pivot.yaml`: W space,
450 steps, lr 5e-3, LPIPS only) pass --config.embedding.method=optim.

Everything else (checkpoints, data, edits, outputs) is configs/dhr.py's.
"""
import importlib.util
import os


def _dhr_config():
  # By path, so this config loads from any working directory.
  path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "dhr.py")
  spec = importlib.util.spec_from_file_location("dhr_config", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def get_config():
  config = _dhr_config()
  config.embedding.update(dict(
      method="e4e",
      # The W pivot, used with method='optim' (continuing DSS's coarse W
      # inversion, as configs/dhr.py's 'optim' does).
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
