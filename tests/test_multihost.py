"""A run split over two `jax.distributed` processes equals one process.

Two `python run.py` processes (coordinator on 127.0.0.1) share the inputs of
tests/test_run.py's tiny e4e stand-in (four good images and a corrupt one)
into one workdir; test_run's single-process run of the same config (the
session's `tiny_run`) is the reference.
"""
import json
import os
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from dhr_jax import checkpoint  # noqa: E402
from dhr_jax import distributed  # noqa: E402
from dhr_jax import runner as run_lib  # noqa: E402
from test_run import GOOD  # noqa: E402
from test_run import _cli_overrides  # noqa: E402
from test_run import _files  # noqa: E402
from test_run import _metrics_rows  # noqa: E402


def _free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


# The one-process run is test_run's reference (conftest's tiny_run: the
# same bundle, inputs and config, run once per session).
@pytest.mark.slow  # two processes running the pipeline, compiling at once
def test_two_processes_equal_one(tiny_run, tmp_path):
  setup = tiny_run
  one = setup["workdir"]
  ref = setup["outcome"]
  assert ref.done == list(GOOD) and ref.status == 1

  two = str(tmp_path / "two")
  port = _free_port()
  procs = []
  for k in range(2):
    env = dict(os.environ, JAX_PLATFORMS="cpu",
               JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}",
               JAX_NUM_PROCESSES="2", JAX_PROCESS_ID=str(k))
    env.pop("XLA_FLAGS", None)  # one device per process
    procs.append(subprocess.Popen(
        [sys.executable, os.path.join(REPO, "run.py"), "--workdir=" + two]
        + _cli_overrides(setup), stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True, env=env, cwd=str(tmp_path)))
  outs = [p.communicate(timeout=900) for p in procs]
  # The corrupt input is process 1's (batches of 2 over the sorted files:
  # (a_rgb, b_gray), (c_rgba, d_broken), (e_wide); process 1 the second):
  # process 1 exits 1 for it, and process 0's summary names it.
  assert [p.returncode for p in procs] == [1, 1], [o[1][-3000:] for o in outs]
  assert all("Traceback" not in err for _, err in outs)
  last = outs[0][1].strip().splitlines()[-1]
  assert last.startswith("DHR: 4 of 5 images done, 1 failed: ") and (
      "d_broken.png" in last), last

  # Same files (one summary.json, metrics.csv, index.html, no lock left),
  # every per-image file the same bytes; done.json apart from its seconds.
  assert _files(one) == _files(two)
  assert sum(f.endswith("summary.json") for f in _files(two)) == 1
  for f in _files(one):
    if f in ("summary.json", "metrics.csv", "index.html"):
      continue
    a = open(os.path.join(one, f), "rb").read()
    b = open(os.path.join(two, f), "rb").read()
    if f.endswith("done.json"):
      a, b = json.loads(a), json.loads(b)
      a["metrics"].pop("seconds"), b["metrics"].pop("seconds")
    assert a == b, f
  for name in GOOD:  # the refined states' arrays, also as arrays
    ta, _ = checkpoint.load(os.path.join(one, name, "refined"))
    tb, _ = checkpoint.load(os.path.join(two, name, "refined"))
    for u, v in zip(jax.tree_util.tree_leaves(ta),
                    jax.tree_util.tree_leaves(tb)):
      np.testing.assert_array_equal(np.asarray(u), np.asarray(v))

  ha, ra = _metrics_rows(one)
  hb, rb = _metrics_rows(two)
  assert ha == hb and len(ra) == len(GOOD)
  for x, y in zip(ra, rb):
    x.pop("seconds"), y.pop("seconds")
    assert x == y
  sa = json.load(open(os.path.join(one, "summary.json")))
  sb = json.load(open(os.path.join(two, "summary.json")))
  assert sb.pop("processes") == 2 and "processes" not in sa
  for s in (sa, sb):
    for key in ("seconds", "devices"):  # time; the two processes' CPUs
      s.pop(key)
    s["means"].pop("seconds")
  assert sa == sb


def test_distributed_environment_is_checked():
  assert distributed.init_distributed({}) is False  # no coordinator: one process
  for env in (dict(JAX_NUM_PROCESSES="two", JAX_PROCESS_ID="0"),
              dict(JAX_NUM_PROCESSES="2"),
              dict(JAX_NUM_PROCESSES="2", JAX_PROCESS_ID="2")):
    with pytest.raises(run_lib.UserError, match="JAX_PROCESS_ID"):
      distributed.init_distributed(dict(env,
                                    JAX_COORDINATOR_ADDRESS="127.0.0.1:1"))
