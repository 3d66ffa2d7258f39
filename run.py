r"""DHR over a folder of images: inversions, masks, edits and metrics.

    python run.py --config=configs/dhr.py --config.data.input=DIR --workdir=OUT
    python run.py --config=configs/demo.py --workdir=/tmp/demo   # no weights
    python run.py --config=configs/compare.py:demo --workdir=/tmp/cmp  # methods side by side

Writes, per image, OUT/<name>/ with input.png, inversion.png, mask.png,
grid.png (titled columns: input | inversion | mask | edits),
edits/<edit>_<strength>.png, refined/ (read it back with
dhr_jax.load_refined) and the marker done.json, which is written last; with
--config.save.intermediate also embedding.png, coarse.png, superpixels.png,
error_map.png (and parsing.png with a parser). Run level: OUT/metrics.csv,
OUT/summary.json and OUT/index.html (every grid with its metrics); the demo
also writes its inputs to OUT/inputs/. A run holds OUT/.lock while it writes.

Re-running with the same workdir skips the images whose outputs are complete,
so a killed run is resumed by starting it again. Editing again with other
directions, without refining again (the earlier edits/ stay and grid.png shows
them all; an edit of the same name and strength replaces its file):

    python run.py --config=configs/dhr.py --workdir=OUT --mode=edit \
        --config.edit.directions=smile=smile.npy --config.edit.strengths=-2,2

Exit status 0 when every image succeeded, 1 when some failed (one summary
line on stderr, details in OUT/summary.json), 2 for unusable settings.
"""
import sys

from absl import app
from absl import flags
from ml_collections import config_flags

from dhr_jax import cli
from dhr_jax import compile_cache
from dhr_jax import precision
from dhr_jax import runner

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Config file, e.g. configs/dhr.py or configs/demo.py.",
    lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Output directory.")
_MODE = flags.DEFINE_enum(
    "mode", "run", ["run", "edit", "compare"],
    "run: invert, refine and edit every input; edit: render config.edit "
    "again for every finished image of --workdir from its saved refined/ "
    "state (no refinement), beside the earlier edits; compare: every method of config.compare from "
    "one embedding (the default with configs/compare.py).")
_CACHE = flags.DEFINE_string(
    "compilation_cache", "",
    "Folder of JAX's persistent compilation cache, so that a second run on "
    "the same settings does not compile again; '' = $JAX_COMPILATION_CACHE_DIR "
    "or ~/.cache/dhr_jax/xla, 'none' = off.")
_PRECISION = flags.DEFINE_enum(
    "precision", precision.DEFAULT, list(precision.CHOICES),
    "Precision of float32 matrix products and convolutions (dhr_jax."
    "precision): float32 everywhere by default; tensorfloat32 / bfloat16 "
    "trade accuracy for speed on accelerators that have them.")


def parse_flags(argv):
  return cli.parse_flags(argv, _CONFIG)


def main(argv):
  if len(argv) > 1:
    print(f"error: unexpected arguments: {' '.join(argv[1:])} (settings are "
          "--config.KEY=VALUE)", file=sys.stderr)
    return 2
  config, mode = _CONFIG.value, _MODE.value
  compile_cache.enable(_CACHE.value)
  precision.set_default(_PRECISION.value)
  if mode == "run" and config is not None and "compare" in config:
    mode = "compare"
  return runner.main(config, _WORKDIR.value, mode)


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags)
