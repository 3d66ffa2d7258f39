"""Shared test fixtures: the golden fixtures of the official implementations."""
import importlib.util
import os
import shutil
import sys
import tempfile

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GOLDEN = os.environ.get("DHR_GOLDEN",
                        os.path.join(os.path.dirname(REPO), "shared", "golden"))


# One compilation cache for the session and the CLI processes it starts (they
# inherit the environment), so a process compiling a program an earlier test
# already compiled reads it back (a tiny pipeline run's start: 71 s → 47 s).
# Compiled programs are XLA's; what they compute is unchanged.
_CACHE = None
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  _CACHE = tempfile.mkdtemp(prefix="dhr_jax_tests_xla_")
  os.environ["JAX_COMPILATION_CACHE_DIR"] = _CACHE
  os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
  if "jax" in sys.modules:  # imported before this file: configure it too
    import jax
    jax.config.update("jax_compilation_cache_dir", _CACHE)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)


# The precision run.py compiles with (`dhr_jax.precision`: float32 on every
# backend): the CLI processes the tests start then find the session's
# programs in the cache above (a different precision is a different program:
# while run.py set it and the tests did not, the two-process test took 92 s
# instead of 63), and float32 stays float32 on an accelerator. On CPU the values are the same either way (the
# demo's outputs are bit-identical).
from dhr_jax import precision  # noqa: E402

precision.set_default()


def pytest_sessionfinish(session, exitstatus):
  del session, exitstatus
  if _CACHE is not None:
    shutil.rmtree(_CACHE, ignore_errors=True)


def rule_module():
  """The golden fixtures' rule.py as a module (public: bench/ reads the
  fixtures with it too)."""
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
  return rule_module()


@pytest.fixture(scope="session")
def golden(rule):
  """golden(name) -> (manifest, arrays) for ../shared/golden/<name>.npz."""
  def load(name):
    return rule.load_golden(os.path.join(GOLDEN, name + ".npz"))
  return load


@pytest.fixture(scope="session")
def diffcam_stand_ins(tmp_path_factory):
  """edit.method='diffcam''s stand-in models, converted, with inputs and
  directions (`test_diffcam_run.make_stand_ins`): ~2 min to make on a busy
  CPU, so once for every test file that runs the method."""
  import test_diffcam_run
  return test_diffcam_run.make_stand_ins(
      tmp_path_factory.mktemp("diffcam_run"))


def rel_l2(a, b):
  import numpy as np
  a = np.asarray(a, np.float64)
  b = np.asarray(b, np.float64)
  return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def same_stand_in(a, b):
  """Whether two manifests give the same `rule.state_dict_from_manifest`."""
  return (a["entries"] == b["entries"] and a.get("fixed", {}) ==
          b.get("fixed", {}) and a.get("rule", "plain") ==
          b.get("rule", "plain"))


@pytest.fixture(scope="session")
def golden_converted(rule, tmp_path_factory):
  """golden_converted(name, converter) -> (exit status, stderr, folder):
  the stand-in weights of ../shared/golden/<name>.npz saved as a plain
  state dict (the released layout of DiffCam's and the deghosting network's
  files), converted by `converter.main` (its command line), once per
  session. test_diffcam, test_deghosting and test_differential (whose
  fixture repeats both manifests) read the same folders: drawing, saving
  and converting the deghosting network's 140M values alone is ~27 s of
  CPU."""
  import contextlib
  import io
  import numpy as np
  torch = pytest.importorskip("torch")
  done = {}

  def convert(name, converter):
    if name not in done:
      manifest, _ = rule.load_golden(os.path.join(GOLDEN, name + ".npz"))
      tmp = tmp_path_factory.mktemp(name)
      src = tmp / (name + ".pt")
      torch.save({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in
                  rule.state_dict_from_manifest(manifest).items()}, src)
      err = io.StringIO()
      with contextlib.redirect_stderr(err):
        code = converter.main(["--src", str(src), "--dst",
                               str(tmp / "converted")])
      os.remove(src)
      done[name] = (code, err.getvalue(), tmp / "converted")
    return done[name]
  return convert

@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
  """test_run's reference: a tiny e4e bundle, its inputs and one in-process
  run of them (`test_run.reference_run`), shared by test_run and
  test_multihost, which compare their other runs with it."""
  import test_run
  return test_run.reference_run(tmp_path_factory.mktemp("run"))
