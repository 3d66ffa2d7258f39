"""The one optimiser of the project: Adam with PyTorch's defaults.

The official DHR loop and the StyleGAN2 projector both use `torch.optim.Adam`
(β 0.9/0.999, ε 1e-8), which is optax's `adam`; the learning rate may be a
traced scalar or a schedule of the step count. Its state does not depend on
the learning rate, so `adam(0.0).init(params)` starts any run.
"""
import optax


def adam(lr):
  """optax Adam with torch's defaults; apply with `optax.apply_updates`."""
  return optax.adam(lr, b1=0.9, b2=0.999, eps=1e-8)
