"""The command line's flags: absl's parsing with one `error:` line and exit
status 2 for a refused flag, and what exactly was wrong with it (an unknown
config key, a value of the wrong type, a missing or broken config file).
"""
import os
import sys

from absl import flags
import ml_collections

from dhr_jax import config_files
from dhr_jax import settings
from dhr_jax.settings import UserError


def config_path(argv):
  """The --config file named in argv ('' when none), without ':args'; the
  last one given wins, as in absl."""
  path = ""
  for i, arg in enumerate(argv):
    if arg.startswith(("--config=", "-config=")):
      path = arg.split("=", 1)[1]
    elif arg in ("--config", "-config") and i + 1 < len(argv):
      path = argv[i + 1]
  return path.split(":", 1)[0]


def load_config_file(path):
  """`get_config()` of a config file, or a UserError saying why not."""
  if not os.path.isfile(path):
    raise UserError(f"--config={path}: no such config file; use "
                    "configs/dhr.py (the paper's settings), configs/demo.py "
                    "(no weights) or a copy of one")
  try:
    return config_files.load_config(path)
  except Exception as e:  # whatever a broken config file raises
    raise UserError(f"--config={path}: cannot load it ({type(e).__name__}: "
                    f"{settings.short(e)})") from None


def _kind(value):
  if isinstance(value, bool):
    return "True or False"
  if isinstance(value, int):
    return "an integer"
  if isinstance(value, float):
    return "a number"
  if isinstance(value, (tuple, list)):
    return "a tuple, e.g. \"('a', 'b')\""
  return "a string" if isinstance(value, str) else type(value).__name__


def override_error(config, argv, error):
  """The first --config.KEY=VALUE of argv that `config` refuses, explained."""
  for arg in argv:
    if not arg.startswith("--config."):
      continue
    key, _, value = arg[len("--config."):].partition("=")
    node, walked = config, "config"
    for part in key.split("."):
      if not isinstance(node, ml_collections.ConfigDict) or part not in node:
        have = (", ".join(sorted(node.keys()))
                if isinstance(node, ml_collections.ConfigDict) else
                f"nothing (it is {_kind(node)})")
        return (f"--config.{key}: no such setting; {walked} has {have}")
      node, walked = node[part], f"{walked}.{part}"
    if f"--config.{key}=" in str(error) or (
        f"--config.{key} " in str(error)):
      return (f"--config.{key}={value}: expected {_kind(node)} (the config "
              f"has {node!r})")
  return None


def parse_flags(argv, config_flag):
  """absl's flag parsing with one `error:` line and exit 2 on bad flags
  (absl would print a traceback or a FATAL line and exit 1); config_flag:
  the `--config` flag holder, whose file is loaded here."""
  try:
    rest = flags.FLAGS(argv)
    config = config_flag.value
    if config is not None:
      config.to_dict()  # a config file that failed to load raises here
  except (flags.Error, AttributeError, KeyError, OSError, TypeError,
          ValueError) as e:
    print(f"error: {explain_flag_error(argv, e)}", file=sys.stderr)
    sys.exit(2)
  return rest


def explain_flag_error(argv, error):
  """One line for a refused command line (unknown key, wrong type, missing
  config file, unknown flag): what was wrong and what is allowed."""
  path = config_path(argv)
  if path or any(a.startswith("--config.") for a in argv):
    try:
      config = load_config_file(path) if path else None
    except UserError as e:
      return str(e)
    if config is not None:
      line = override_error(config, argv, error)
      if line:
        return line
  text = str(error).strip().splitlines()
  return text[0] if text else type(error).__name__

