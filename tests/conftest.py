"""Shared test fixtures: the golden fixtures of the official implementations."""
import importlib.util
import os

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GOLDEN = os.environ.get("DHR_GOLDEN",
                        os.path.join(os.path.dirname(REPO), "shared", "golden"))


def _rule_module():
  path = os.path.join(GOLDEN, "rule.py")
  if not os.path.isfile(path):
    raise FileNotFoundError(
        f"golden fixtures not found at {GOLDEN}: clone with ../shared beside "
        "the repo or set DHR_GOLDEN")
  spec = importlib.util.spec_from_file_location("golden_rule", path)
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod


@pytest.fixture(scope="session")
def rule():
  """The golden fixtures' `rule.py` (stand-in weights and inputs)."""
  return _rule_module()


@pytest.fixture(scope="session")
def golden(rule):
  """golden(name) -> (manifest, arrays) for ../shared/golden/<name>.npz."""
  def load(name):
    return rule.load_golden(os.path.join(GOLDEN, name + ".npz"))
  return load


def rel_l2(a, b):
  import numpy as np
  a = np.asarray(a, np.float64)
  b = np.asarray(b, np.float64)
  return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))
