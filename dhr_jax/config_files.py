"""Config files (configs/*.py) loaded by path.

absl's config_flags loads a config file by path, not as a module of a
package; configs that build on configs/dhr.py, the run's own checks and the
tests load theirs the same way, so they work from any working directory.
"""
import importlib.util
import os


def load_config(path):
  """`get_config()` of the config file at `path`."""
  name = "_config_" + os.path.splitext(os.path.basename(path))[0]
  spec = importlib.util.spec_from_file_location(name, path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()
