"""A run's settings: checked before anything is loaded or created, described
in words for summary.json, and fingerprinted for resuming.

Bad settings raise `UserError` (one line for the user, exit status 2).
"""
import hashlib
import json
import math
import re

from dhr_jax import pipeline
from dhr_jax import refine
from dhr_jax import segmentation


class UserError(Exception):
  """A problem the user fixes (paths, settings): reported in one line."""


def short(reason, limit=160):
  """`reason` on one line of at most `limit` characters."""
  reason = " ".join(str(reason).split())
  return reason if len(reason) <= limit else reason[:limit - 1] + "…"


FARL_CMD = ("python -m converters.farl --src "
            "face_parsing.farl.celebm.main_ema_181500_jit.pt --dst {path}")


# config.model.parser values meaning "no parser" ("" is the old spelling).
NO_PARSER = ("none", "")


def parser_path(config):
  """The face parser's checkpoint path of `config.model.parser`, or None
  when the run goes without one ('none', or the old '')."""
  value = config.model.parser.strip()
  return None if value.lower() in NO_PARSER else value


def _thresholds_in_words(c):
  if c.adaptive:
    return "Otsu's threshold of each image's superpixel scores"
  return f"one threshold ({c.single_threshold:g}) for every superpixel"


def dss_description(config):
  """What DSS does under `config`, in words (summary.json's "dss")."""
  if edit_method(config) != "dhr":
    return f"none: edit.method={edit_method(config)!r} runs no DSS"
  c = config.dss
  # Named variants of the official DSS that are switched on.
  variants = "".join(
      f", dss.{k}={c[k]!r}" for k, allowed in segmentation.CHOICES.items()
      if c.get(k, allowed[0]) != allowed[0])
  if parser_path(config) is None:
    return (f"no parser: {_thresholds_in_words(c)}, no parsing mask"
            f"{variants}; not the paper's DSS")
  if c.adaptive:
    return (f"FaRL parser: parsing mask, but {_thresholds_in_words(c)} "
            f"instead of one per parsing class{variants}; not the paper's "
            "DSS")
  if variants:
    return (f"FaRL parser, a threshold per parsing class and the parsing "
            f"mask{variants}; not the paper's DSS")
  return ("the paper's: FaRL parser, a threshold per parsing class and the "
          "parsing mask")


def no_parser_warning(config):
  """The one line a run without a parser starts with."""
  return (f"config.model.parser={config.model.parser!r}: DSS without a face "
          f"parser uses {_thresholds_in_words(config.dss)} and no parsing "
          "mask; not the paper's DSS (convert the parser: "
          f"{FARL_CMD.format(path='ckpt/farl')})")


def landmarks_description(config, face_models):
  """Where the parser's landmarks come from (summary.json's
  "parser_landmarks"); None without a parser."""
  if parser_path(config) is None:
    return None
  if face_models is None:
    return ("canonical FFHQ template (the faces extra is not installed); "
            "the official code detects faces with RetinaFace")
  if config.data.get("align", False):
    return ("dlib's landmarks of each aligned face (the FFHQ template "
            "where the detector misses it)")
  return ("dlib HOG detector, top-scoring face (RetinaFace's weights are "
          "not to be had offline); no face: no parsing mask, class 0")


# --------------------------------------------------------------------------
# Checks


def one_of(key, value, allowed):
  if value not in allowed:
    raise UserError(f"config.{key} must be one of "
                    f"{', '.join(map(str, allowed))}; got {value!r}")


def at_least(key, value, low):
  if value < low:
    raise UserError(f"config.{key} must be ≥ {low}; got {value}")


def validate_config(config):
  """Refuses unusable settings before anything is loaded or created."""
  at_least("batch_size", int(config.batch_size), 1)
  e = config.embedding
  one_of("embedding.method", e.method, pipeline.EMBEDDINGS)
  one_of("embedding.space", e.space, ("w", "w+"))
  one_of("embedding.init", e.get("init", "latent_avg"),
         pipeline.EMBEDDING_INITS)
  at_least("embedding.steps", int(e.steps), 0)
  at_least("embedding.n_mean_latent", int(e.n_mean_latent), 1)
  at_least("embedding.restyle_iterations", int(e.get(
      "restyle_iterations", pipeline.RESTYLE_ITERATIONS)), 1)
  at_least("dss.coarse_steps", int(config.dss.coarse_steps), 1)
  at_least("dss.n_segments", int(config.dss.n_segments), 1)
  for key, allowed in segmentation.CHOICES.items():
    if key in config.dss:
      one_of(f"dss.{key}", config.dss[key], allowed)
  r = config.refine
  one_of("refine.mode", r.mode, refine.MODES)
  at_least("refine.feature_steps", int(r.feature_steps), 1)
  at_least("refine.weight_steps", int(r.weight_steps), 0)
  if int(r.weight_steps) > int(r.feature_steps):
    raise UserError(
        f"config.refine.weight_steps ({r.weight_steps}) must be ≤ "
        f"config.refine.feature_steps ({r.feature_steps}): the weights are "
        "refined during the first weight_steps of the feature steps")
  one_of("edit.ganspace_mode", config.edit.ganspace_mode, ("add", "set"))
  one_of("edit.method", edit_method(config), EDIT_METHODS)
  if not math.isfinite(float(config.edit.get("alpha", 0.0))):
    raise UserError(f"config.edit.alpha must be a finite number; got "
                    f"{config.edit.alpha}")
  if config.data.input == "synthetic" and "synthetic" not in config.data:
    raise UserError("config.data.input='synthetic' needs config.data."
                    "synthetic (see configs/demo.py)")
  if config.data.get("align", False):
    if config.data.input == "synthetic":
      raise UserError("config.data.align=True aligns faces in photos: set "
                      "--config.data.input=PHOTO_OR_DIR")
    one_of("data.faces", config.data.faces, ("largest", "all"))
    at_least("data.min_face_size", int(config.data.min_face_size), 0)


# An encoder's name in config.compare.encoders: it names files too.
_ENCODER_NAME = re.compile(r"[A-Za-z0-9_-]+")


def compare_encoders(config):
  """config.compare.encoders → {name: converted bundle folder}, in the
  given order ({} when unset): "name=DIR,name2=DIR" or a mapping; DIR
  'stand-in' is the demo's in-memory stand-in."""
  value = config.get("compare", {}).get("encoders", "") or ""
  if isinstance(value, str):
    pairs = []
    for item in value.split(","):
      name, sep, path = (p.strip() for p in item.partition("="))
      if not item.strip():
        continue
      if not sep or not name or not path:
        raise UserError(f"config.compare.encoders: {item.strip()!r} is not "
                        "name=DIR (e.g. e4e=ckpt/e4e_ffhq,psp=ckpt/psp_ffhq)")
      pairs.append((name, path))
  else:
    pairs = [(str(k), str(v)) for k, v in dict(value).items()]
  out = {}
  for name, path in pairs:
    if not _ENCODER_NAME.fullmatch(name) or name in out:
      raise UserError(f"config.compare.encoders: {name!r} is "
                      f"{'named twice' if name in out else 'not a name'}; "
                      "use letters, digits, _ and -, once each")
    out[name] = path
  return out


# config.edit.method: how a run edits (README "Editing via differential
# activations" for 'diffcam').
EDIT_METHODS = ("dhr", "diffcam")


def edit_method(config):
  """config.edit.method ('dhr' when absent: configs from before it)."""
  return config.edit.get("method", "dhr")


def check_feature_idx(config, G):
  try:
    refine.refine_spec(G, int(config.refine.feature_idx), config.refine.mode)
  except ValueError as e:
    raise UserError(f"config.refine.feature_idx: {e}") from None


def fingerprint(config):
  """Hash of the settings that determine an image's outputs.

  Edits (re-done by --mode=edit; those of edit.method='diffcam' are its
  outputs and count), the ID network (a metric only) and the
  batch size (it changes results by float rounding only) are left out, the
  spellings of "no parser" are one;
  a marker with another fingerprint is stale.
  """
  d = config.to_dict()
  edit = d.pop("edit", {})
  if edit_method(config) == "diffcam":
    # No refined state to re-edit: the edits are the outputs. DSS, the
    # embedding's optimisation, the refinement and the parser take no part.
    d["edit"] = {k: edit.get(k) for k in ("method", "alpha", "directions")}
    for section in ("dss", "embedding", "refine"):
      d.pop(section, None)
    d["model"].pop("parser", None)
  else:
    # The differential-activation models change no DHR output.
    d["model"].pop("diffcam", None)
    d["model"].pop("deghosting", None)
  if config.embedding.method != "restyle":
    # Only ReStyle iterates: other runs keep their fingerprint.
    d.get("embedding", {}).pop("restyle_iterations", None)
  d.pop("batch_size", None)
  # The ID network adds a metric column; it changes no image.
  d["model"].pop("id_network", None)
  if parser_path(config) is None:
    d["model"]["parser"] = ""  # 'none' and '' are the same run
  return hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()
                        ).hexdigest()[:16]

