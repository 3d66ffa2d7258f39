"""Inversion methods, each one function from an embedded batch to results.

Every method takes the batch after DSS and the shared embedding
(`pipeline.Embedded`) and returns one `ImageResult` per real image of the
batch: its inversion, its edits, its metrics against the input. A run is
the method of config.edit.method ('dhr' or 'diffcam'); the comparison runs
several on the same embedding:

  embedding  the codes rendered by the unrefined generator;
  pti        generator weights tuned alone (config.refine updated by
             config.compare.pti) around its pivot: PTI's own W pivot, a
             fresh optimisation from latent_avg (config.compare.
             pti_embedding), or with config.compare.pti_pivot='embedding'
             the shared embedding;
  hfgi       HFGI's consultation of the e4e codes (`Models.hfgi`);
  dhr        hybrid refinement with config.refine;
  diffcam    editing via differential activations (edit.method='diffcam':
             pSp, DiffCam, deghosting; no DSS and no shared embedding).

A new method (another refinement) is one more function of the same
signature in `METHODS`. A method run from another encoder's codes is named
'<method>@<encoder>' (`split`; the comparison's 'embedding@psp',
'dhr@psp'): the batch loop gives it the shared batch with that encoder's
embedding (`with_encoder`, once per batch and encoder), or to diffcam,
which encodes the batch itself, that encoder as `Models.encoder`
(`models_with_encoder`; the comparison's 'diffcam@psp').
"""
import dataclasses
import time
from typing import Any, Optional

from absl import logging
import ml_collections
import numpy as np

from dhr_jax import differential
from dhr_jax import edits as edits_lib
from dhr_jax import io
from dhr_jax import metrics as metrics_lib
from dhr_jax import pipeline
from dhr_jax import synthetic
from dhr_jax.models import hfgi as hfgi_lib


@dataclasses.dataclass
class ImageResult:
  """One method's result for one image (numpy, batch axis removed).

  ok / reason: False and why when the image failed (non-finite losses or
  outputs); image: the inversion; edits: {label: (H, W, 3) image}; the DSS
  fields (embedding, coarse, mask, superpixels, boundaries, parsing,
  error_map) are the batch's, shared by every method, None for methods
  without DSS (`NEEDS_DSS`); refined: a `refine.Refinement` of this image
  (methods that refine), for saving and re-editing; pictures: more outputs
  {relative path: (H, W[, 3]) uint8}; notes: more entries for the image's
  marker (e.g. warnings).
  """
  name: str
  ok: bool
  reason: str
  target: np.ndarray
  image: np.ndarray
  edits: dict
  metrics: dict
  embedding: Optional[np.ndarray] = None
  coarse: Optional[np.ndarray] = None
  mask: Optional[np.ndarray] = None
  superpixels: Optional[np.ndarray] = None
  boundaries: Optional[np.ndarray] = None
  parsing: Optional[np.ndarray] = None
  error_map: Optional[np.ndarray] = None
  refined: Any = None
  losses_in: Optional[np.ndarray] = None
  losses_out: Optional[np.ndarray] = None
  method: str = "dhr"
  pictures: dict = dataclasses.field(default_factory=dict)
  notes: dict = dataclasses.field(default_factory=dict)


def _results(models, emb, method, image, rendered, ok, reasons, *,
             refined=None, losses=(None, None), ground_truth=None,
             progress=None, metric_image=None):
  """ImageResults of the batch's n real images (shared DSS fields from
  `emb`), scored against the inputs."""
  report = progress or (lambda stage: None)
  n = len(emb.names)
  dss = emb.dss
  report("metrics")
  scores = metrics_lib.image_metrics(
      image[:n] if metric_image is None else metric_image, emb.x[:n],
      dss.mask[:n], models.lpips_alex, models.lpips_vgg)
  out = []
  for i, name in enumerate(emb.names):
    m = dict(scores[i])
    if ground_truth is not None and name in ground_truth:
      m.update(synthetic.ground_truth_metrics(
          image[i], emb.embedded[i], emb.target[i], dss.mask[i],
          ground_truth[name]))
    out.append(ImageResult(
        name=name, ok=ok[i], reason=reasons[i], target=emb.target[i],
        embedding=emb.embedded[i], coarse=np.asarray(dss.coarse[i]),
        mask=np.asarray(dss.mask[i]), superpixels=dss.superpixels[i],
        boundaries=dss.boundaries[i],
        parsing=None if dss.parsing is None else dss.parsing[i],
        error_map=np.asarray(dss.error_map[i]), image=np.asarray(image[i]),
        refined=None if refined is None else refined[i],
        edits=rendered[i], metrics=m,
        losses_in=None if losses[0] is None else losses[0][i],
        losses_out=None if losses[1] is None else losses[1][i],
        method=method))
  return out


def _unrefined(models, emb, method, images, rendered, ground_truth,
               progress):
  """Results of a method that renders without refining (no losses)."""
  ok = [pipeline.finite(images[i], *rendered[i].values())
        for i in range(len(emb.names))]
  reasons = ["" if o else "non-finite output (NaN/inf)" for o in ok]
  return _results(models, emb, method, images, rendered, ok, reasons,
                  ground_truth=ground_truth, progress=progress)


def _refined(models, emb, method, result, edits, ground_truth, progress):
  """Results of a refinement of `emb` (`pipeline.refine_batch`): edits
  rendered with every finite image's refined weights, offset and mask."""
  image = np.asarray(result.image)
  losses_in = np.asarray(result.losses_in)
  losses_out = np.asarray(result.losses_out)
  codes = np.asarray(emb.codes)
  n = len(emb.names)
  ok, reasons, refined, rendered = [], [], [], []
  for i in range(n):
    good = pipeline.finite(losses_in[i], losses_out[i], image[i], codes[i])
    reasons.append("" if good else (
        "non-finite loss or output (NaN/inf) during embedding or refinement"))
    refined.append(result[i] if good else None)
    ok.append(good)
    rendered.append({})
  out = _results(models, emb, method, image, rendered, ok, reasons,
                 refined=refined, losses=(losses_in, losses_out),
                 ground_truth=ground_truth, progress=progress,
                 metric_image=result.image[:n])
  (progress or (lambda stage: None))("edits")
  for r in out:
    if r.ok:
      r.edits = edits_lib.render_edits(models.G, r.refined, edits)
      if not pipeline.finite(*r.edits.values()):
        r.ok, r.reason = False, "an edit rendered non-finite values (NaN/inf)"
  return out


# --------------------------------------------------------------------------
# The methods: fn(models, config, emb, edits, *, ground_truth, progress)
#   → [ImageResult]


def dhr(models, config, emb, edits, *, ground_truth=None, progress=None):
  """DHR: the hybrid refinement of config.refine from the shared embedding."""
  result = pipeline.refine_batch(models, config.refine, emb,
                                 progress=progress)
  return _refined(models, emb, "dhr", result, edits, ground_truth, progress)


def pti_pivot(config):
  """config.compare.pti_pivot ('w' when absent: PTI's own W pivot)."""
  return config.compare.get("pti_pivot", "w")


def pti_config(config):
  """A copy of the config whose refine section is PTI's."""
  c = ml_collections.ConfigDict(config.to_dict())
  c.refine.update(config.compare.pti.to_dict())
  return c


def pti(models, config, emb, edits, *, ground_truth=None, progress=None):
  """PTI: the generator weights tuned alone around its pivot."""
  start = emb
  if pti_pivot(config) == "w":
    codes, embedded = pipeline.embed(
        models, config.compare.pti_embedding, emb.x, emb.padded_names,
        int(config.seed), progress=progress)
    start = dataclasses.replace(emb, codes=codes,
                                embedded=np.asarray(embedded))
  result = pipeline.refine_batch(models, pti_config(config).refine, start,
                                 progress=progress)
  return _refined(models, start, "pti", result, edits, ground_truth,
                  progress)


def embedding(models, config, emb, edits, *, ground_truth=None,
              progress=None):
  """The shared embedding's codes rendered by the unrefined generator."""
  n = len(emb.names)
  images = emb.embedded[:n]
  rendered = [edits_lib.generator_edits(models.G, emb.codes[i:i + 1], edits)
              for i in range(n)]
  return _unrefined(models, emb, "embedding", images, rendered,
                    ground_truth, progress)


def hfgi(models, config, emb, edits, *, ground_truth=None, progress=None):
  """HFGI's consultation of the shared (e4e) codes; edits move the codes and
  consult the same input."""
  G, H = models.G, models.hfgi
  n = len(emb.names)
  codes = emb.codes[:n]
  # At HFGI's input size (256² but for the demo's stand-in).
  x_in = io.resize_target(np.asarray(emb.x[:n]), H.config.input_size)
  images = np.asarray(hfgi_lib.hfgi_invert(G, H, codes, x_in))
  rendered = [{} for _ in range(n)]
  if edits:
    edited, labels = edits_lib.codes_of(edits, codes)
    for j, label in enumerate(labels):
      out = np.asarray(hfgi_lib.hfgi_invert(G, H, codes, x_in,
                                            edited_codes=edited[:, j]))
      for i in range(n):
        rendered[i][label] = out[i]
  return _unrefined(models, emb, "hfgi", images, rendered, ground_truth,
                    progress)


def diffcam(models, config, emb, edits, *, ground_truth=None,
            progress=None):
  """Editing via differential activations (`differential`): pSp's codes
  edited along each direction, the edit blended into the photo where
  DiffCam puts it, deghosted. No DSS, no refinement; the inversion is
  G(pSp's codes)."""
  report = progress or (lambda stage: None)
  E, G, C, D = models.encoder, models.G, models.diffcam, models.deghosting
  n, b = len(emb.names), len(emb.padded_names)
  rendered = [{} for _ in range(n)]
  pictures = [{} for _ in range(n)]
  empty = [[] for _ in range(n)]
  # pSp and the inversion's render once; each direction does the rest.
  report("embedding")
  inversion = differential.invert(E, G, emb.x)
  inverted = np.asarray(inversion.inverted[:n])
  for spec in edits:
    label = spec.labels[0]
    report(f"differential edit {label}")
    de = differential.edit_inversion(
        G, C, D, inversion, spec.direction, np.full((b,), spec.target),
        spec.strengths[0])
    parts = dict(manipulated=de.manipulated, fused=de.fused)
    parts = {k: io.to_uint8(np.asarray(v[:n])) for k, v in parts.items()}
    heat, flat = np.asarray(de.heat_map[:n]), np.asarray(de.empty[:n])
    deghosted = np.asarray(de.deghosted[:n])
    for i in range(n):
      rendered[i][label] = deghosted[i]
      pictures[i].update({f"diffcam/{label}/{k}.png": v[i]
                          for k, v in parts.items()})
      pictures[i][f"diffcam/{label}/heat_map.png"] = io.mask_to_uint8(
          heat[i])
      if flat[i]:
        empty[i].append(label)
  report("metrics")
  # The inversion is whole-image: no mask, no in/out-of-domain shares.
  scores = metrics_lib.image_metrics(
      inverted, emb.x[:n], np.ones(inverted.shape[:3] + (1,), np.float32),
      models.lpips_alex, models.lpips_vgg)
  out = []
  for i, name in enumerate(emb.names):
    m = {k: v for k, v in scores[i].items()
         if k not in ("in_domain", "out_of_domain")}
    ok = pipeline.finite(inverted[i], *rendered[i].values())
    notes = {}
    if empty[i]:
      logging.warning("%s: DiffCam's heat map is empty for %s: no edit "
                      "region, the edit is the photo", name,
                      ", ".join(empty[i]))
      notes["empty_heat_map"] = empty[i]
    out.append(ImageResult(
        name=name, ok=ok, reason="" if ok else "non-finite output (NaN/inf)",
        target=emb.target[i], image=inverted[i], edits=rendered[i],
        metrics=m, method="diffcam", pictures=pictures[i], notes=notes))
  return out


def split(method):
  """'dhr@psp' → ('dhr', 'psp'): the method of `METHODS` and the encoder of
  `Models.encoders` it starts from; 'dhr' → ('dhr', None), the shared
  embedding."""
  base, _, encoder = method.partition("@")
  return base, encoder or None


def with_encoder(models, config, emb, name, progress=None):
  """The batch `emb` (DSS shared) with the codes and image of encoder
  `name` of `models.encoders` (ReStyle iterated config.embedding.
  restyle_iterations times); the shared embedding itself when that is
  the run's own encoder."""
  E = models.encoders[name]
  if E is models.encoder:
    return emb
  (progress or (lambda stage: None))("embedding")
  codes, embedded = pipeline.encode(
      models.G, E, emb.x, restyle_iterations=config.embedding.get(
          "restyle_iterations", pipeline.RESTYLE_ITERATIONS))
  return dataclasses.replace(emb, codes=codes, embedded=np.asarray(embedded))


def models_with_encoder(models, name):
  """`models` with encoder `name` of `models.encoders` as the run's
  encoder: for a method that encodes the batch itself (diffcam)."""
  return dataclasses.replace(models, encoder=models.encoders[name])


METHODS = dict(embedding=embedding, pti=pti, hfgi=hfgi, dhr=dhr,
               diffcam=diffcam)
# The methods that read the batch's DSS and shared embedding
# (`pipeline.segment_and_embed`); a run of none of them skips both.
NEEDS_DSS = frozenset(("embedding", "pti", "hfgi", "dhr"))


def run_batch(models, config, target, names, *, edits=(), ground_truth=None,
              progress=None, landmarks=None):
  """DHR on one batch: `pipeline.segment_and_embed`, then `dhr`.

  Args:
    models: `loading.Models`.
    config: the run config (fields embedding, dss, refine, seed,
      batch_size).
    target: (n, H, W, 3) float images in [-1, 1] at the generator size,
      n ≤ batch_size; the batch is padded to batch_size (rounded up to a
      multiple of the device count) by repeating the last image, and the
      padding is dropped from the results.
    names: n image names (they seed the per-image randomness).
    edits: `edits.EditSpec`s rendered for every image.
    ground_truth: optional {name: `synthetic.GroundTruth`}.
    progress: optional `progress(stage)`, told the stage as it starts
      ('coarse inversion step k/N' (DSS's), 'segmentation', 'embedding'
      [and 'embedding step k/N' when it optimises], 'refinement step k/N',
      'metrics', 'edits'); the steps are reported from XLA's callback
      thread while the compiled loops run.
    landmarks: optional (n, 5, 2) five landmarks per image for the parser
      (`dhr_jax.photos.parser_landmarks`; an all-NaN row: no face found);
      None: the canonical FFHQ ones.

  Returns:
    ([ImageResult] for the n real images, {stage: seconds}).
  """
  emb = pipeline.segment_and_embed(models, config, target, names,
                                   progress=progress, landmarks=landmarks)
  t = time.perf_counter()
  results = dhr(models, config, emb, edits, ground_truth=ground_truth,
                progress=progress)
  return results, dict(emb.times, dhr=time.perf_counter() - t)
