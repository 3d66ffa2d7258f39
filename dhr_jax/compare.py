"""One command that compares inversion methods (the paper's Table 1).

    python run.py --config=configs/compare.py --config.data.input=DIR --workdir=OUT
    python run.py --config=configs/compare.py:demo --workdir=OUT   # no weights

Every image is segmented (DSS) and embedded once; from that one embedding
each method of config.compare.methods (`dhr_jax.methods`: embedding only,
PTI, HFGI, DHR) gives its inversion and edits, through the run's own batch
loop (`dhr_jax.loop`). HFGI needs config.model.hfgi (left out with a warning
otherwise); PTI's seconds include its pivot's, the first row from the
shared embedding that embedding's. With config.compare.encoders
(name → converted bundle) the rows are the paper's Table 1
(`table1_methods`): each encoder alone ('embedding@<name>', its seconds
include its encoding, once per batch) and under DHR ('dhr@<name>'),
ReStyle iterated, HFGI on the e4e entry's codes. With
config.edit.method='diffcam' (and config.model.diffcam, config.model.
deghosting) the row "Diff-CAM (pSp)" edits by differential activations
from pSp's codes (the pSp of config.compare.encoders, else the run's own
pSp embedding), and every other method renders the same directions
(w + α·d/‖d‖) with its own generator.

Writes OUT/<name>/grid.png (a row per method, titled with its name:
inversion and every edit; the first row the input and DSS's mask),
OUT/<name>/<method>.png (each inversion; Diff-CAM's heat maps, manipulated
and fused images under OUT/<name>/diffcam/), and the mean over images per
method as OUT/compare.csv and OUT/compare.md: MSE, PSNR, LPIPS-Alex,
LPIPS-VGG, MSE, PSNR and LPIPS-Alex as the paper scores them (paper_mse,
paper_psnr, paper_lpips_alex: `metrics.paper_metrics`), id_dlib (when dlib
finds a face in the input), id_curricularface (the paper's ID metric, with
config.model.id_network), the refinement seconds per image, and on
synthetic inputs the PSNR inside (psnr_in) and
outside (psnr_out, the pasted patch) the known in-domain region and the
edit fidelity: the edits' PSNR against the true edits G(e(w_true)) outside
the patch (edit_psnr_in, `synthetic.edit_fidelity`).
"""
import os

from absl import logging
import ml_collections
import numpy as np

from dhr_jax import files
from dhr_jax import io
from dhr_jax import loop
from dhr_jax import methods as methods_lib
from dhr_jax import metrics
from dhr_jax import pictures
from dhr_jax import settings
from dhr_jax import synthetic
from dhr_jax import workdir as workdir_lib
from dhr_jax.models import encoders
from dhr_jax.settings import UserError

METHODS = ("embedding", "pti", "hfgi", "dhr", "diffcam")
# PTI's pivot: its own W optimisation, or the run's shared embedding.
PTI_PIVOTS = ("w", "embedding")
TABLE = ("mse", "psnr", "lpips_alex", "lpips_vgg") + metrics.PAPER_METRICS + (
    "id_dlib", "id_curricularface", "psnr_in", "psnr_out", "edit_psnr_in",
    "seconds")


# The encoders' names as the paper's tables write them.
ENCODER_TITLES = dict(e4e="e4e", psp="pSp", lsap="LSAP", restyle="ReStyle")


def encoder_title(name):
  return ENCODER_TITLES.get(name.lower(), name)


def _no_e4e(config):
  """The warning of an HFGI row left out for want of e4e codes."""
  entry = "e4e=stand-in" if config.model.get("hfgi") == "stand-in" else (
      "e4e=DIR")
  return ("HFGI left out: it consults e4e's codes; name the e4e bundle in "
          f"config.compare.encoders ({entry})")


DIFFCAM_TITLE = "Diff-CAM (pSp)"
# Where the Diff-CAM row's pSp comes from, when the run has none.
_NO_PSP = ("config.edit.method='diffcam': the Diff-CAM row edits pSp's "
           "codes; name a converted pSp bundle in config.compare.encoders "
           "(psp=DIR) or embed with it (--config.embedding.method=psp "
           "--config.model.checkpoint=DIR)")


def diffcam_method(models):
  """The Diff-CAM row's key: 'diffcam@<name>' of the first pSp of
  `models.encoders`, else 'diffcam' (the run's own pSp embedding); None
  when no pSp was loaded (`validate` has refused a comparison that names
  none, so its folder was missing: the row is left out)."""
  for name, E in models.encoders.items():
    if encoders.arch_of(E) == "psp":
      return f"diffcam@{name}"
  if models.encoder is not None and encoders.arch_of(models.encoder) == "psp":
    return "diffcam"
  return None


def method_title(method, config, archs=None):
  """The name shown on the grid and in the table. archs: {name: arch} of
  config.compare.encoders (the Table 1 layout, `table1_methods`: every
  DHR and HFGI row names its encoder)."""
  base, name = methods_lib.split(method)
  if base == "diffcam":
    return DIFFCAM_TITLE
  if name is not None:
    n = encoder_title(name)
    if base != "embedding":
      return f"{dict(dhr='DHR', hfgi='HFGI')[base]} ({n})"
    if archs[name] == "restyle":  # iterated: the paper's ReStyle row
      return "ReStyle" if n == "ReStyle" else f"ReStyle ({n})"
    return f"{n} only"
  own = encoder_title(config.embedding.method)
  if method == "embedding":
    return f"{own} only"
  if method == "pti":
    pivot = "W" if methods_lib.pti_pivot(config) == "w" else own
    return f"PTI ({pivot} pivot)"
  title = dict(hfgi="HFGI", dhr="DHR")[method]
  return f"{title} ({own})" if archs else title


def table1_methods(config, methods, models):
  """config.compare.methods in the paper's Table 1 layout → (method keys,
  {encoder: arch}). Without config.compare.encoders: the methods as given,
  from the run's own embedding. With them (the loaded ones, in order):
  '<name> only' per encoder, ReStyle (its encoder's, iterated) after them,
  PTI, HFGI on e4e's codes (the encoder named e4e, else the run's own e4e
  embedding), DHR per encoder (not ReStyle's); the run's own embedding
  keeps its 'only' and DHR rows unless an encoder of the map is it.
  Diff-CAM's row last (`diffcam_method`)."""
  last = []
  if "diffcam" in methods:
    last = [diffcam_method(models)]
    if last == [None]:
      # Like every row whose checkpoint is missing: out, with one warning.
      logging.warning("%s left out: no pSp encoder was loaded (%s)",
                      DIFFCAM_TITLE, _NO_PSP)
      last = []
  if not settings.compare_encoders(config):
    if "hfgi" in methods and config.embedding.method != "e4e":
      # Only the demo's stand-in HFGI gets here (`validate`).
      logging.warning(_no_e4e(config))
      methods = tuple(m for m in methods if m != "hfgi")
    return [m for m in methods if m != "diffcam"] + last, {}
  archs = {n: encoders.arch_of(E) for n, E in models.encoders.items()}
  own = all(E is not models.encoder for E in models.encoders.values())
  coded = [n for n in archs if archs[n] != "restyle"]
  keys = []
  if "embedding" in methods:
    keys += (["embedding"] if own else []) + [
        f"embedding@{n}" for n in coded + [
            n for n in archs if archs[n] == "restyle"]]
  if "pti" in methods:
    keys.append("pti")
  if "hfgi" in methods and models.hfgi is not None:
    if archs.get("e4e") == "e4e":
      keys.append("hfgi@e4e")
    elif config.embedding.method == "e4e" and own:
      keys.append("hfgi")
    else:
      logging.warning(_no_e4e(config))
  if "dhr" in methods:
    keys += (["dhr"] if own else []) + [f"dhr@{n}" for n in coded]
  return keys + last, archs


def methods_of(config):
  """config.compare.methods as a tuple, checked; with config.edit.method=
  'diffcam' 'diffcam' is one of them (added when not given)."""
  methods = tuple(m.strip() for m in str(config.compare.methods).split(",")
                  if m.strip())
  for m in methods:
    if m not in METHODS:
      raise UserError(f"config.compare.methods: unknown method {m!r}; "
                      f"choose from {', '.join(METHODS)}")
  if not methods:
    raise UserError("config.compare.methods is empty; e.g. "
                    f"{','.join(METHODS[:-1])}")
  diffcam = settings.edit_method(config) == "diffcam"
  if "diffcam" in methods and not diffcam:
    raise UserError("config.compare.methods: diffcam edits by differential "
                    "activations; set --config.edit.method=diffcam (with "
                    "config.model.diffcam, config.model.deghosting and "
                    "config.edit.directions)")
  return methods + (("diffcam",) if diffcam and "diffcam" not in methods
                    else ())


def validate(config):
  """Refuses unusable compare settings (and the run's own, for DHR and PTI)."""
  if "compare" not in config:
    raise UserError("--mode=compare needs config.compare (use "
                           "configs/compare.py)")
  settings.validate_config(config)
  methods = methods_of(config)
  given = settings.compare_encoders(config)
  if "diffcam" in methods and config.embedding.method != "psp" and not any(
      name not in encoders.ARCHS or name == "psp" for name in given):
    raise UserError(_NO_PSP)
  if "pti" in methods:
    try:
      settings.validate_config(methods_lib.pti_config(config))
    except UserError as e:
      raise UserError(f"config.compare.pti: {e}") from None
    if methods_lib.pti_pivot(config) not in PTI_PIVOTS:
      raise UserError(
          f"config.compare.pti_pivot must be one of {', '.join(PTI_PIVOTS)}; "
          f"got {methods_lib.pti_pivot(config)!r}")
    if methods_lib.pti_pivot(config) == "w":
      e = config.compare.get("pti_embedding")
      if e is None or e.method != "optim" or e.get(
          "init", "latent_avg") != "latent_avg":
        raise UserError(
            "config.compare.pti_embedding: PTI's W pivot is an optimisation "
            "from latent_avg (method='optim', init='latent_avg'; see "
            "configs/compare.py), or set config.compare.pti_pivot=embedding")
      c = ml_collections.ConfigDict(config.to_dict())
      c.embedding = e
      try:
        settings.validate_config(c)
      except UserError as err:
        raise UserError(f"config.compare.pti_embedding: {err}"
                               ) from None
  for name, path in given.items():
    if path == "stand-in" and (name not in synthetic.STAND_IN_ARCHS or
                               config.model.checkpoint != "stand-in"):
      raise UserError(
          f"config.compare.encoders['{name}']='stand-in': stand-in encoders "
          f"are {', '.join(synthetic.STAND_IN_ARCHS)} of the stand-in "
          "generator "
          "(model.checkpoint='stand-in', the demo)")
  hfgi = config.model.get("hfgi", "")
  if ("hfgi" in methods and hfgi == "stand-in"
      and config.model.checkpoint != "stand-in"):
    raise UserError(synthetic.HFGI_STAND_IN_ONLY)
  # The demo's stand-in without a stand-in e4e is left out with a warning
  # (`table1_methods`), as are the rows of every missing encoder.
  if "hfgi" in methods and hfgi not in ("", "stand-in") and not given and (
      config.embedding.method != "e4e"):
    raise UserError("config.model.hfgi: HFGI consults e4e codes; set "
                           "--config.embedding.method=e4e")
  return methods



def _uses_shared(method, config, models):
  """Does `method` start from the run's own embedding (no encoder of its
  own, or the entry that is the run's encoder; PTI only around it)?"""
  base, name = methods_lib.split(method)
  if name is not None and models.encoders.get(name) is not models.encoder:
    return False
  if base == "pti":
    return methods_lib.pti_pivot(config) == "embedding"
  return base in methods_lib.NEEDS_DSS


def png_name(method):
  """OUT/<name>/<png_name>: 'dhr.png', 'dhr_psp.png' (method 'dhr@psp')."""
  return method.replace("@", "_") + ".png"


def grid(target, mask, results, titles, edit_names=()):
  """The image's comparison grid: input and mask (None: the input alone,
  no method ran DSS), then a row per method ({method: ImageResult}:
  inversion and edits), each tile titled with the method's name."""
  heads = [io.to_uint8(target)] + (
      [] if mask is None else [io.mask_to_uint8(mask)])
  rows = [pictures.titled_grid(heads, ["input", "mask (white = in-domain)"
                                       ][:len(heads)])]
  for method, r in results.items():
    edit_titles = pictures.grid_titles(list(r.edits), edit_names)[3:]
    rows.append(pictures.titled_grid(
        [io.to_uint8(r.image)] + [io.to_uint8(e) for e in r.edits.values()],
        [f"{titles[method]} inversion"]
        + [f"{titles[method]} {t}" for t in edit_titles]))
  width = max(r.shape[1] for r in rows)
  rows = [np.pad(r, ((0, 2), (0, width - r.shape[1]), (0, 0)),
                 constant_values=255) for r in rows]
  return np.concatenate(rows, axis=0)


def table(per_image, methods, titles):
  """Rows of the mean over images per method (columns of TABLE present for
  every image of that method) → (rows, columns). per_image: {name:
  {method: ImageResult}}."""
  rows = []
  for method in methods:
    ms = [e[method].metrics for e in per_image.values() if method in e]
    if not ms:
      continue
    row = dict(method=titles[method], images=len(ms))
    for c in TABLE:
      if all(c in m for m in ms):
        row[c] = float(np.mean([m[c] for m in ms]))
    rows.append(row)
  columns = ["method", "images"] + [c for c in TABLE
                                    if any(c in r for r in rows)]
  return rows, columns


def markdown(rows, columns):
  """The table as GitHub markdown (4 significant digits)."""
  cell = lambda v: f"{v:.4g}" if isinstance(v, float) else str(v)
  lines = ["| " + " | ".join(columns) + " |",
           "|" + "---|" * len(columns)]
  lines += ["| " + " | ".join(cell(r.get(c, "")) for c in columns) + " |"
            for r in rows]
  return "\n".join(lines) + "\n"



def run(config, workdir):
  """The comparison of config.compare.methods over config.data.input."""
  methods = validate(config)
  if config.data.get("align", False):
    raise UserError("config.data.align is not supported by the "
                    "comparison yet; align the photos with a normal "
                    "run first and compare its face crops")
  with loop.prepare(config, workdir, hfgi="hfgi" in methods,
                    compare_encoders=True) as s:
    if s.models.hfgi is None:  # not configured: left out with a warning
      methods = tuple(m for m in methods if m != "hfgi")
    methods, archs = table1_methods(config, methods, s.models)
    titles = {m: method_title(m, config, archs) for m in methods}
    edit_names = [e.name for e in s.edits]
    gt = s.ground_truth or {}
    batches = loop.BatchLoop(s, s.entries, methods, desc="compare",
                             titles=titles)
    # As an encoder's first row counts its encoding, the first row from the
    # run's own embedding counts that embedding ('embed' of the batch).
    own = next((m for m in methods if _uses_shared(m, config, s.models)),
               None)
    per_image = {}
    for batch in batches:
      for name in batch.todo:
        results = {}
        for method, r in batch.results[name].items():
          if not r.ok:
            logging.warning("%s: %s gave non-finite values; left out", name,
                            method)
            continue
          r.metrics["seconds"] = (batch.times[method] + (
              batch.times.get("embed", 0.0) if method == own else 0.0)
                                  ) / len(batch.results)
          if name in gt:
            r.metrics.update(synthetic.edit_fidelity(s.models.G, gt[name],
                                                     s.edits, r.edits))
          results[method] = r
        directory = os.path.join(s.workdir, workdir_lib.output_name(name))
        for method, r in results.items():
          files.save_png(os.path.join(directory, png_name(method)),
                         io.to_uint8(r.image))
          # Diff-CAM's heat maps, manipulated and fused images.
          for rel, picture in r.pictures.items():
            files.save_png(os.path.join(directory, rel), picture)
        every = list(batch.results[name].values())
        # DSS's mask: the methods that ran it share it (diffcam has none).
        first = next((r for r in every if r.mask is not None), every[0])
        files.save_png(os.path.join(directory, "grid.png"), grid(
            first.target, first.mask, results, titles, edit_names))
        per_image[name] = results
    rows, columns = table(per_image, methods, titles)
    files.write_csv(os.path.join(s.workdir, "compare.csv"), rows, columns)
    files.write_text(os.path.join(s.workdir, "compare.md"),
                     markdown(rows, columns))
  loop.print_table(rows, columns)
  failed = batches.failed
  if failed:
    # Unreadable inputs and batches that raised, each with its reason.
    return loop.Outcome(list(per_image), failed, 0, 1,
                        f"compare: {len(failed)} image(s) failed: " +
                        "; ".join(f"{f['file']} ({f['reason']})"
                                  for f in failed))
  return loop.Outcome(list(per_image), [], 0, 0,
                      f"compare: {len(per_image)} image(s), "
                      f"{len(rows)} methods in {s.workdir}/compare.md")
