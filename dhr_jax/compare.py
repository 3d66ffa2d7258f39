"""One command that compares inversion methods (the paper's Table 1).

    python run.py --config=configs/compare.py --config.data.input=DIR --workdir=OUT
    python run.py --config=configs/compare.py:demo --workdir=OUT   # no weights

Every image is segmented (DSS) and embedded once; from that one embedding
each method of config.compare.methods gives its inversion and edits:

  embedding  the codes rendered by the unrefined generator (e4e only, or the
             optimisation embedding in the demo);
  pti        generator weights tuned alone (`pipeline.refine_batch` with
             config.refine updated by config.compare.pti: configs/pti.py)
             around its pivot: by default PTI's own W pivot, a fresh
             optimisation from latent_avg (config.compare.pti_embedding,
             GANInverter's pti_pivot.yaml), "PTI (W pivot)"; with
             config.compare.pti_pivot='embedding' the shared embedding,
             e.g. "PTI (e4e pivot)". Its seconds include the pivot's;
  hfgi       HFGI's consultation of the e4e codes (needs config.model.hfgi;
             skipped with a warning otherwise);
  dhr        hybrid refinement with config.refine.

Writes OUT/<name>/grid.png (a row per method, titled with its name:
inversion and every edit; the first row the input and DSS's mask),
OUT/<name>/<method>.png (each inversion), and the mean over images per
method as OUT/compare.csv and OUT/compare.md: MSE, PSNR, LPIPS-Alex,
LPIPS-VGG, MSE, PSNR and LPIPS-Alex as the paper scores them (paper_mse,
paper_psnr, paper_lpips_alex: `metrics.paper_metrics`), id_dlib (when dlib
finds a face in the input), id_curricularface (the paper's ID metric, with
config.model.id_network), the refinement seconds per image, and on
synthetic inputs the PSNR inside (psnr_in) and
outside (psnr_out, the pasted patch) the known in-domain region and the
edit fidelity: the edits' PSNR against the true edits G(e(w_true)) outside
the patch (edit_psnr_in, `pipeline.edit_fidelity`).
"""
import contextlib
import dataclasses
import os
import time

from absl import logging
import ml_collections
import numpy as np

from dhr_jax import identity
from dhr_jax import io
from dhr_jax import photos
from dhr_jax import pipeline
from dhr_jax import runner
from dhr_jax.models import hfgi as hfgi_lib

METHODS = ("embedding", "pti", "hfgi", "dhr")
# PTI's pivot: its own W optimisation, or the run's shared embedding.
PTI_PIVOTS = ("w", "embedding")
TABLE = ("mse", "psnr", "lpips_alex", "lpips_vgg") + pipeline.PAPER_METRICS + (
    "id_dlib", "id_curricularface", "psnr_in", "psnr_out", "edit_psnr_in",
    "seconds")


def method_title(method, config):
  """The name shown on the grid and in the table."""
  if method == "embedding":
    return f"{config.embedding.method} only"
  if method == "pti":
    pivot = ("W" if pti_pivot(config) == "w" else
             config.embedding.method)
    return f"PTI ({pivot} pivot)"
  return dict(hfgi="HFGI", dhr="DHR")[method]


def pti_pivot(config):
  """config.compare.pti_pivot ('w' when absent: PTI's own W pivot)."""
  return config.compare.get("pti_pivot", "w")


def methods_of(config):
  """config.compare.methods as a tuple, checked."""
  methods = tuple(m.strip() for m in str(config.compare.methods).split(",")
                  if m.strip())
  for m in methods:
    if m not in METHODS:
      raise runner.UserError(f"config.compare.methods: unknown method {m!r}; "
                             f"choose from {', '.join(METHODS)}")
  if not methods:
    raise runner.UserError("config.compare.methods is empty; e.g. "
                           f"{','.join(METHODS)}")
  return methods


def pti_config(config):
  """A copy of the config whose refine section is PTI's."""
  c = ml_collections.ConfigDict(config.to_dict())
  c.refine.update(config.compare.pti.to_dict())
  return c


def validate(config):
  """Refuses unusable compare settings (and the run's own, for DHR and PTI)."""
  if "compare" not in config:
    raise runner.UserError("--mode=compare needs config.compare (use "
                           "configs/compare.py)")
  methods = methods_of(config)
  runner.validate_config(config)
  if "pti" in methods:
    try:
      runner.validate_config(pti_config(config))
    except runner.UserError as e:
      raise runner.UserError(f"config.compare.pti: {e}") from None
    if pti_pivot(config) not in PTI_PIVOTS:
      raise runner.UserError(
          f"config.compare.pti_pivot must be one of {', '.join(PTI_PIVOTS)}; "
          f"got {pti_pivot(config)!r}")
    if pti_pivot(config) == "w":
      e = config.compare.get("pti_embedding")
      if e is None or e.method != "optim" or e.get(
          "init", "latent_avg") != "latent_avg":
        raise runner.UserError(
            "config.compare.pti_embedding: PTI's W pivot is an optimisation "
            "from latent_avg (method='optim', init='latent_avg'; see "
            "configs/compare.py), or set config.compare.pti_pivot=embedding")
      c = ml_collections.ConfigDict(config.to_dict())
      c.embedding = e
      try:
        runner.validate_config(c)
      except runner.UserError as err:
        raise runner.UserError(f"config.compare.pti_embedding: {err}"
                               ) from None
  if "hfgi" in methods and config.model.get("hfgi", "") and (
      config.embedding.method != "e4e"):
    raise runner.UserError("config.model.hfgi: HFGI consults e4e codes; set "
                           "--config.embedding.method=e4e")
  return methods


def _hfgi_outputs(G, H, codes, x, edits):
  """(images (n, H, W, 3), [{label: image}]) of HFGI for codes (n, L, D)."""
  x256 = io.resize_target(np.asarray(x))
  images = np.asarray(hfgi_lib.hfgi_invert(G, H, codes, x256))
  rendered = [{} for _ in range(codes.shape[0])]
  if edits:
    edited, labels = pipeline.edited_codes(edits, codes)
    for j, label in enumerate(labels):
      out = np.asarray(hfgi_lib.hfgi_invert(G, H, codes, x256,
                                            edited_codes=edited[:, j]))
      for i in range(codes.shape[0]):
        rendered[i][label] = out[i]
  return images, rendered


def compare_batch(models, config, methods, target, names, *, edits=(),
                  ground_truth=None, hfgi=None, progress=None,
                  landmarks=None):
  """Every method on one batch from one embedding (landmarks: the parser's,
  as `pipeline.run_batch` takes them).

  Returns {name: {'target', 'mask', 'methods': {method: {'image', 'edits',
  'metrics'}}}}; methods that fail (non-finite output) are left out of an
  image's 'methods' with a warning. progress: optional `progress(stage)`,
  told `pipeline.segment_and_embed`'s stages, then each method's as
  '<title>: <stage>' ('DHR: refinement step k/N', 'PTI (W pivot):
  embedding step k/N', 'HFGI: edits', ...).
  """
  G = models.G
  emb = pipeline.segment_and_embed(models, config, target, names,
                                   progress=progress, landmarks=landmarks)
  n = len(names)
  x, mask = emb.x[:n], emb.dss.mask[:n]
  out = {name: dict(target=emb.target[i], mask=np.asarray(mask[i]),
                    methods={}) for i, name in enumerate(names)}
  for method in methods:
    if method == "hfgi" and hfgi is None:
      continue
    t = time.perf_counter()
    # None stays None down to the compiled loops (see
    # `pipeline.step_reporter`); `note` tells the stages between them.
    report = None if progress is None else (
        lambda stage, title=method_title(method, config):
        progress(f"{title}: {stage}"))
    note = report or (lambda stage: None)
    note("edits" if method == "embedding" else
         "inversion and edits" if method == "hfgi" else "starting")
    if method == "embedding":
      images = emb.embedded[:n]
      rendered = [pipeline.generator_edits(G, emb.codes[i:i + 1], edits)
                  for i in range(n)]
    elif method == "hfgi":
      images, rendered = _hfgi_outputs(G, hfgi, emb.codes[:n], x, edits)
    else:
      start = emb
      if method == "pti" and pti_pivot(config) == "w":
        codes, embedded = pipeline.embed(
            models, config.compare.pti_embedding, emb.x, emb.padded_names,
            int(config.seed), progress=report)
        start = dataclasses.replace(emb, codes=codes,
                                    embedded=np.asarray(embedded))
      rc = pti_config(config).refine if method == "pti" else config.refine
      result = pipeline.refine_batch(models, rc, start, progress=report)
      note("edits")
      images = np.asarray(result.image)[:n]
      rendered = [pipeline.render_edits(G, result[i], edits)
                  for i in range(n)]
    seconds = (time.perf_counter() - t) / n
    note("metrics")
    metrics = pipeline.image_metrics(images, x, mask, models.lpips_alex,
                                     models.lpips_vgg)
    for i, name in enumerate(names):
      if not pipeline._finite(images[i], *rendered[i].values()):
        logging.warning("%s: %s gave non-finite values; left out", name,
                        method)
        continue
      m = dict(metrics[i], seconds=seconds)
      if ground_truth is not None and name in ground_truth:
        gt = pipeline.ground_truth_metrics(
            images[i], emb.embedded[i], emb.target[i], mask[i],
            ground_truth[name])
        m.update(psnr_in=gt["psnr_in"], psnr_out=gt["psnr_out"])
        m.update(pipeline.edit_fidelity(G, ground_truth[name], edits,
                                        rendered[i]))
      out[name]["methods"][method] = dict(image=images[i],
                                          edits=rendered[i], metrics=m)
  return out


def grid(entry, titles, edit_names=()):
  """The image's comparison grid: input and mask, then a row per method
  (inversion and edits), each tile titled with the method's name."""
  rows = [io.titled_grid([io.to_uint8(entry["target"]),
                          io.mask_to_uint8(entry["mask"])],
                         ["input", "mask (white = in-domain)"])]
  for method, r in entry["methods"].items():
    edit_titles = io.grid_titles(list(r["edits"]), edit_names)[3:]
    rows.append(io.titled_grid(
        [io.to_uint8(r["image"])] + [io.to_uint8(e)
                                     for e in r["edits"].values()],
        [f"{titles[method]} inversion"]
        + [f"{titles[method]} {t}" for t in edit_titles]))
  width = max(r.shape[1] for r in rows)
  rows = [np.pad(r, ((0, 2), (0, width - r.shape[1]), (0, 0)),
                 constant_values=255) for r in rows]
  return np.concatenate(rows, axis=0)


def table(per_image, methods, titles):
  """Rows of the mean over images per method (columns of TABLE present for
  every image of that method) → (rows, columns)."""
  rows = []
  for method in methods:
    ms = [e["methods"][method]["metrics"] for e in per_image.values()
          if method in e["methods"]]
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
  workdir = os.path.abspath(workdir)
  methods = validate(config)
  try:
    io.check_creatable(workdir)
  except io.WorkdirError as e:
    raise runner.UserError(str(e)) from None
  entries = None
  if config.data.input != "synthetic":
    try:
      entries = io.list_images(config.data.input)
    except io.ImageError as e:
      raise runner.UserError(str(e)) from None
  if config.data.get("align", False):
    raise runner.UserError("config.data.align is not supported by the "
                           "comparison yet; align the photos with a normal "
                           "run first and compare its face crops")
  face_models = runner._face_models(config)
  hfgi_path = config.model.get("hfgi", "")
  with contextlib.ExitStack() as held:
    if os.path.isdir(workdir):
      held.enter_context(runner._lock(workdir))
    models = runner.load_models(config, pipeline.make_mesh())
    runner._check_feature_idx(config, models.G)
    edits = runner.build_edits(config.edit, models.G)
    H = None
    if "hfgi" in methods:
      if not hfgi_path:
        logging.warning("HFGI left out: config.model.hfgi is not set")
      elif not os.path.exists(hfgi_path):
        raise runner.UserError(
            f"config.model.hfgi {hfgi_path!r} not found; convert it with "
            "python -m converters.hfgi")
      else:
        H = hfgi_lib.load_hfgi(hfgi_path)
    if not os.path.isdir(workdir):
      try:
        io.check_writable(workdir)
      except io.WorkdirError as e:
        raise runner.UserError(str(e)) from None
      held.enter_context(runner._lock(workdir))
    return _compare(config, workdir, entries, models, edits, methods, H,
                    face_models)


def _compare(config, workdir, entries, models, edits, methods, H,
             face_models):
  G = models.G
  gt = None
  if config.data.input == "synthetic":
    source, gt = runner._synthetic_inputs(config, workdir, G)
    entries = io.list_images(source)
  titles = {m: method_title(m, config) for m in methods}
  edit_names = [e.name for e in edits]
  size = G.config["size"]
  b = pipeline.padded_size(None, config.batch_size, models.n_devices)
  per_image, failed = {}, []
  progress = runner.Progress(len(entries), 0, desc="compare")
  n_batches = -(-len(entries) // b)
  for start in range(0, len(entries), b):
    names, images = [], []
    for name, path in entries[start:start + b]:
      try:
        images.append(io.load_image(path, size))
        names.append(name)
      except io.ImageError as e:
        logging.warning("skipping %s", e)
        failed.append(dict(name=name, file=path,
                           reason=runner._short(str(e))))
        progress.update(1)
    if not names:
      continue
    progress.start_batch(start // b + 1, n_batches, names)
    landmarks = None
    if models.parser is not None:  # as a run finds them
      landmarks, _ = photos.parser_landmarks(face_models, np.stack(images))
    try:
      results = compare_batch(models, config, methods, np.stack(images),
                              names, edits=edits, ground_truth=gt, hfgi=H,
                              progress=progress, landmarks=landmarks)
    except pipeline.PipelineError as e:
      progress.close()
      raise runner.UserError(str(e)) from None
    progress("writing")
    for name, entry in results.items():
      if face_models is not None:
        for r in entry["methods"].values():
          ids = photos.identity_metrics(face_models, entry["target"],
                                        r["image"], {})
          r["metrics"].update(ids)
          if models.id_network is not None:
            r["metrics"].update(identity.metrics(
                models.id_network, face_models, entry["target"], r["image"]))
      directory = os.path.join(workdir, io.output_name(name))
      for method, r in entry["methods"].items():
        io.save_png(os.path.join(directory, f"{method}.png"),
                    io.to_uint8(r["image"]))
      io.save_png(os.path.join(directory, "grid.png"),
                  grid(entry, titles, edit_names))
      per_image[name] = entry
      progress.update(1)
  progress.close()
  rows, columns = table(per_image, methods, titles)
  io.write_csv(os.path.join(workdir, "compare.csv"), rows, columns)
  io.write_text(os.path.join(workdir, "compare.md"), markdown(rows, columns))
  runner._print_table(rows, columns)
  if failed:
    return runner.Outcome(list(per_image), failed, 0, 1,
                          f"compare: {len(failed)} image(s) unreadable: "
                          f"{', '.join(f['file'] for f in failed)}")
  return runner.Outcome(list(per_image), [], 0, 0,
                        f"compare: {len(per_image)} image(s), "
                        f"{len(rows)} methods in {workdir}/compare.md")
