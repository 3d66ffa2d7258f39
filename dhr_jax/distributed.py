"""Several processes (hosts) sharing one run.

JAX_COORDINATOR_ADDRESS=host:port, JAX_NUM_PROCESSES=N and JAX_PROCESS_ID=k
make this process one of N (process 0 runs the coordinator). The processes
share no arrays: each inverts its own batches on its own devices, and they
exchange small JSON values and meet at barriers through the coordination
service, which needs no cross-process collectives (not set up for CPU by
default). Process 0 writes the run-level files.
"""
import json
import os

import jax

from dhr_jax.settings import UserError

# How long a process waits for its siblings (the slowest one's share of the
# images, and the models' loading).
SIBLING_TIMEOUT_MS = 24 * 3600 * 1000


def init_distributed(environ=None):
  """Joins a multi-process run when JAX_COORDINATOR_ADDRESS is set.

  JAX_COORDINATOR_ADDRESS=host:port, JAX_NUM_PROCESSES=N and
  JAX_PROCESS_ID=k (0 ≤ k < N, process 0 runs the coordinator) are passed to
  `jax.distributed.initialize`, before anything else uses JAX. Returns
  whether it did; bad values are a UserError.
  """
  environ = os.environ if environ is None else environ
  if not environ.get("JAX_COORDINATOR_ADDRESS"):
    return False
  try:
    count = int(environ.get("JAX_NUM_PROCESSES", ""))
    index = int(environ.get("JAX_PROCESS_ID", ""))
  except ValueError:
    raise UserError("JAX_COORDINATOR_ADDRESS is set, so JAX_NUM_PROCESSES "
                    "and JAX_PROCESS_ID must be integers (got "
                    f"{environ.get('JAX_NUM_PROCESSES')!r}, "
                    f"{environ.get('JAX_PROCESS_ID')!r})") from None
  if count < 1 or not 0 <= index < count:
    raise UserError(f"JAX_PROCESS_ID={index} must be in [0, "
                    f"JAX_NUM_PROCESSES={count})")
  jax.distributed.initialize(environ["JAX_COORDINATOR_ADDRESS"], count, index)
  return True


def coordination():
  """The coordination service's client (None in a single-process run)."""
  if jax.process_count() == 1:
    return None
  # The client (key-value store, barriers) has no public alias; jax's own
  # checkpointing reaches it the same way. This is the project's one use of
  # a private JAX module.
  from jax._src import distributed as jax_distributed
  return jax_distributed.global_state.client


def gather_failures(failed, skipped, order):
  """Each process's failures and skips → process 0, once every process has
  finished its share.

  Returns (failed, skipped) of the whole run on process 0 (failures sorted
  by `order`, {name: position}), None on the others; (failed, skipped)
  unchanged in a single-process run.
  """
  client = coordination()
  if client is None:
    return failed, skipped
  process, n_processes = jax.process_index(), jax.process_count()
  client.key_value_set(f"dhr/finished/{process}",
                       json.dumps(dict(failed=failed, skipped=skipped)))
  client.wait_at_barrier("dhr/finished", SIBLING_TIMEOUT_MS)
  if process != 0:
    return None
  failed, skipped = [], 0
  for j in range(n_processes):
    share = json.loads(client.blocking_key_value_get(
        f"dhr/finished/{j}", SIBLING_TIMEOUT_MS))
    failed += share["failed"]
    skipped += share["skipped"]
  failed.sort(key=lambda f: order.get(f["name"], len(order)))
  return failed, skipped
