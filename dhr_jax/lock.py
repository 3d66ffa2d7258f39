"""The workdir lock: one run writes into a workdir at a time.

`OUT/.lock` is locked with flock, which the kernel releases when the holder
exits however it ends, so a lock left by a killed run is never stale; the
file holds the holder's pid for the refusal message.
"""
import contextlib
import errno
import fcntl
import os

import jax

from dhr_jax import distributed
from dhr_jax import files
from dhr_jax.settings import UserError


class WorkdirBusy(files.WorkdirError):
  """Another process holds the output directory's lock."""

  def __init__(self, directory, pid):
    self.pid = pid
    holder = f"pid {pid}" if pid else "a process that has not written its pid"
    super().__init__(f"workdir {directory} is in use by another run ({holder}"
                     "); wait for it to finish or choose another --workdir")


class WorkdirLock:
  """An exclusive lock on a workdir, held while a run writes into it.

  `OUT/.lock` is locked with flock, which the kernel releases when the
  holder exits however it ends, so a lock left by a killed run is never
  stale; the file holds the holder's pid for the refusal message.
  """
  NAME = ".lock"

  def __init__(self, directory, name=NAME):
    # name: the sibling processes of a multi-process run lock `.lock.<k>`
    # beside process 0's `.lock` (see `hold`).
    self.directory = os.path.abspath(os.fspath(directory))
    self.path = os.path.join(self.directory, name)
    self._fd = None

  def acquire(self):
    """Takes the lock or raises WorkdirBusy naming the holder's pid."""
    while True:
      fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666 & ~files.umask())
      try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
      except OSError as e:
        os.close(fd)
        if e.errno not in (errno.EAGAIN, errno.EACCES):
          raise
        raise WorkdirBusy(self.directory, self._holder()) from None
      # A releasing holder unlinks the file: a lock on the unlinked inode
      # would not exclude the next run, so take the one at the path.
      try:
        same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
      except FileNotFoundError:
        same = False
      if same:
        break
      os.close(fd)
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    self._fd = fd
    return self

  def _holder(self):
    try:
      with open(self.path) as f:
        return int(f.read().strip() or 0)
    except (OSError, ValueError):
      return 0

  def release(self):
    if self._fd is None:
      return
    try:
      os.remove(self.path)
    except FileNotFoundError:
      pass
    os.close(self._fd)  # closing releases the flock
    self._fd = None

  def __enter__(self):
    return self.acquire()

  def __exit__(self, *exc):
    self.release()



@contextlib.contextmanager
def hold(workdir):
  """Holds the workdir's lock; another run holding it is a UserError.

  In a run of several processes, process 0 holds `.lock` (which excludes
  every other run, single- or multi-process) and process k `.lock.<k>`;
  process k goes on only once process 0 has said it holds `.lock`.
  """
  client, k = distributed.coordination(), jax.process_index()
  try:
    lock = WorkdirLock(
        workdir, WorkdirLock.NAME + (f".{k}" if k else "")).acquire()
  except WorkdirBusy as e:
    if client is not None and k == 0:
      client.key_value_set("dhr/lock", f"error: {e}")
    raise UserError(str(e)) from None
  try:
    if client is not None:
      if k == 0:
        client.key_value_set("dhr/lock", "ok")
      else:
        said = client.blocking_key_value_get("dhr/lock",
                                             distributed.SIBLING_TIMEOUT_MS)
        if said != "ok":
          raise UserError(f"process 0 could not lock {workdir}: "
                          + said.removeprefix("error: "))
    yield lock
  finally:
    lock.release()
