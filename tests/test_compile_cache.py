"""The persistent compilation cache that run.py and the app turn on."""
import os
import subprocess
import sys

from dhr_jax import compile_cache

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Compiles one program under compile_cache.enable(ARG) in a fresh process;
# every program is written (min compile time 0), so the folder shows it.
_PROBE = """
import sys
import jax, jax.numpy as jnp
from dhr_jax import compile_cache
print(compile_cache.enable(sys.argv[1]))
jax.jit(lambda x: jnp.sin(x) * 2)(jnp.ones(3)).block_until_ready()
"""


def _run(arg, tmp_path, **env):
  e = {k: v for k, v in os.environ.items()
       if k != "JAX_COMPILATION_CACHE_DIR"}
  e.update(XDG_CACHE_HOME=str(tmp_path / "xdg"), PYTHONPATH=REPO,
           JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0", **env)
  p = subprocess.run([sys.executable, "-c", _PROBE, arg], env=e,
                     capture_output=True, text=True, timeout=300)
  assert p.returncode == 0, p.stderr
  return p


def _files(d):
  return [f for _, _, fs in os.walk(d) for f in fs] if os.path.isdir(d) else []


def test_default_folder_is_the_user_cache(tmp_path):
  p = _run("", tmp_path)
  folder = str(tmp_path / "xdg" / "dhr_jax" / "xla")
  assert p.stdout.split()[0] == folder
  assert _files(folder), "nothing was written to the cache"


def test_env_folder_wins_and_none_turns_it_off(tmp_path):
  env_dir = tmp_path / "env_cache"
  p = _run("", tmp_path, JAX_COMPILATION_CACHE_DIR=str(env_dir))
  assert p.stdout.split()[0] == str(env_dir)
  assert _files(str(env_dir))
  p = _run("none", tmp_path)
  assert p.stdout.split()[0] == "None"
  assert not _files(str(tmp_path / "xdg"))


def test_unwritable_folder_warns_and_runs(tmp_path):
  blocker = tmp_path / "file"
  blocker.write_text("")
  p = _run(str(blocker / "cache"), tmp_path)
  assert p.stdout.split()[0] == "None"
  assert "cannot be used" in p.stderr and "--compilation_cache=none" in p.stderr


def test_default_dir_without_env(tmp_path):
  assert compile_cache.default_dir({"XDG_CACHE_HOME": "/c"}) == "/c/dhr_jax/xla"
  assert compile_cache.default_dir(
      {"JAX_COMPILATION_CACHE_DIR": "/j", "XDG_CACHE_HOME": "/c"}) == "/j"
