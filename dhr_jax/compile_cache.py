"""JAX's persistent compilation cache for the programs a user starts.

Compiling the refinement and the coarse inversion takes tens of seconds on a
CPU, every time a process starts. With the cache on, XLA writes each compiled
program under a folder and a later process with the same shapes, code and jax
version reads it back instead of compiling: a second `run.py` on the same
settings does not compile again. What a program computes does not change.

run.py and the browser editor turn it on by default (`--compilation_cache`):
"" = `$JAX_COMPILATION_CACHE_DIR` when set (the tests set it), else
`$XDG_CACHE_HOME/dhr_jax/xla` (`~/.cache/dhr_jax/xla`); a path = that folder;
"none" = off. Library code never turns it on: a research program that imports
dhr_jax keeps its own JAX settings.
"""
import os
import sys

import jax

OFF = "none"


def default_dir(environ=None):
  """The folder used when none is named."""
  env = os.environ if environ is None else environ
  if env.get("JAX_COMPILATION_CACHE_DIR"):
    return env["JAX_COMPILATION_CACHE_DIR"]
  base = env.get("XDG_CACHE_HOME") or os.path.join(
      os.path.expanduser("~"), ".cache")
  return os.path.join(base, "dhr_jax", "xla")


def enable(path=""):
  """Turns the cache on in `path` ("" = `default_dir()`; "none" = off).

  Call before anything is compiled. Returns the folder in use, or None when
  off. A folder that cannot be made is one warning, and the run goes on
  compiling as before: a cache is never a reason to fail a run.
  """
  if path == OFF:
    return None
  path = os.path.abspath(os.path.expanduser(path or default_dir()))
  try:
    os.makedirs(path, exist_ok=True)
    if not os.access(path, os.W_OK):
      raise PermissionError("not writable")
  except OSError as e:
    print(f"warning: compilation cache {path} cannot be used ({e}); "
          "compiling as usual (--compilation_cache=none silences this)",
          file=sys.stderr)
    return None
  jax.config.update("jax_compilation_cache_dir", path)
  return path
