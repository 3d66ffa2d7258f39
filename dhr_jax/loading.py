"""The models a run needs: loaded and checked (a missing or wrong file is a
`UserError` naming the command that converts it), bundled as `Models` and
replicated over the devices' mesh."""
import dataclasses
import os
from typing import Any

from absl import logging
import jax
import numpy as np

from dhr_jax import checkpoint
from dhr_jax import faces
from dhr_jax import embedding as embedding_lib
from dhr_jax import photos
from dhr_jax import pipeline
from dhr_jax import settings
from dhr_jax import synthetic
from dhr_jax.models import curricularface
from dhr_jax.models import deghosting as deghosting_lib
from dhr_jax.models import diffcam as diffcam_lib
from dhr_jax.models import encoders
from dhr_jax.models import farl
from dhr_jax.models import hfgi as hfgi_lib
from dhr_jax.models import lpips
from dhr_jax.models import stylegan2
from dhr_jax.models.stylegan2 import Generator
from dhr_jax.settings import UserError


# --------------------------------------------------------------------------
# The bundle


@dataclasses.dataclass(eq=False)
class Models:
  """Everything a batch needs besides the images.

  G: generator;  lpips_vgg / lpips_alex: LPIPS metrics;  encoder: the
  embedding's (`embedding.method` 'e4e', 'psp' or 'restyle');  parser:
  optional face parser for DSS;
  w_stats: (mean, spread) of W for the optimisation-based inversions;
  id_network: optional IR-101 of the paper's ID metric (scored on host, not
  replicated);  hfgi: optional HFGI model (the comparison's HFGI method);
  diffcam / deghosting: DiffCam and the deghosting network of
  edit.method='diffcam' (`encoder` is then pSp);  encoders: the
  comparison's {name: encoder} (`load_compare_encoders`);  mesh: a 1-D
  `jax.sharding.Mesh` (axis 'batch'); None: the first local
  device alone.
  """
  G: Generator
  lpips_vgg: Any
  lpips_alex: Any
  encoder: Any = None
  parser: Any = None
  w_stats: Any = None
  id_network: Any = None
  mesh: Any = None
  hfgi: Any = None
  diffcam: Any = None
  deghosting: Any = None
  encoders: dict = dataclasses.field(default_factory=dict)

  def __post_init__(self):
    if self.mesh is None:
      self.mesh = make_mesh(jax.local_devices()[:1])

  @property
  def n_devices(self):
    return self.mesh.devices.size

  def shard(self, x):
    """The batch axis of x over the mesh's devices."""
    return jax.device_put(x, jax.sharding.NamedSharding(
        self.mesh, jax.sharding.PartitionSpec("batch")))


def make_mesh(devices=None):
  """A 1-D mesh named 'batch' over `devices` (one device: a mesh of one).

  Default: this process's devices (in a multi-process run every process
  refines its own images on its own devices, see `dhr_jax.distributed`).
  """
  devices = jax.local_devices() if devices is None else list(devices)
  return jax.sharding.Mesh(np.asarray(devices), ("batch",))


def _replicated(mesh):
  return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())


def prepare_models(G, lpips_vgg, lpips_alex, *, encoder=None, parser=None,
                   id_network=None, seed=0, n_mean_latent=10000, mesh=None):
  """Bundles the models; replicates their weights over `mesh` (None: the
  first local device alone).

  w_stats (the W mean the optimisations start from, and its spread) are
  computed once here from the run seed, so every image starts alike.
  """
  if mesh is None:
    mesh = make_mesh(jax.local_devices()[:1])
  # Models are pytrees: their weights are replicated, configs untouched.
  G, lpips_vgg, lpips_alex, encoder, parser = jax.device_put(
      (G, lpips_vgg, lpips_alex, encoder, parser), _replicated(mesh))
  key = jax.random.fold_in(jax.random.PRNGKey(seed), 0x57A75)
  w_stats = jax.device_put(embedding_lib.latent_stats(G, key, n_mean_latent),
                           _replicated(mesh))
  return Models(G=G, lpips_vgg=lpips_vgg, lpips_alex=lpips_alex,
                encoder=encoder, parser=parser, w_stats=w_stats,
                id_network=id_network, mesh=mesh)


# --------------------------------------------------------------------------
# Loading


def _missing(path, what, command):
  return UserError(f"{what} {path!r} not found. Convert the released PyTorch "
                   f"file first: {command}")


_E4E_CMD = ("python -m converters.e4e --src e4e_ffhq_encode.pt "
            "--dst {path}")
_G_CMD = "python -m converters.stylegan2 --src stylegan2-ffhq-config-f.pt --dst {path}"
_ID_CMD = ("python -m converters.curricularface --src "
           "CurricularFace_Backbone.pth --dst {path}")
_FARL_SOURCE = ("(facer's FaRL celebm/448 parser, github.com/FacePerceiver/"
                "facer release models-v1)")
_NO_PARSER_HINT = ("; or run without a parser, not the paper's DSS: "
                   "--config.model.parser=none")


def face_models(config):
  """dlib's models when the `faces` extra is installed, else None (then no
  id_dlib metrics); config.data.align requires them."""
  try:
    return photos.face_models(required=bool(config.data.get("align", False)))
  except faces.FacesUnavailable as e:
    raise UserError(f"config.data.align=True: {e}") from None


def load_generator(config):
  """The generator of `config.model` (a converted checkpoint or the stand-in)."""
  m = config.model
  if m.checkpoint == "stand-in":
    s = m.stand_in
    return stylegan2.init_generator(
        jax.random.PRNGKey(int(s.seed)), size=int(s.size),
        style_dim=int(s.style_dim), n_mlp=int(s.n_mlp),
        channels=int(s.channels), noise_strength=float(s.noise_strength))
  path = m.generator or m.checkpoint
  # Without model.generator it is the embedding's bundle's.
  cmd = _G_CMD if m.generator else ENCODER_CMDS.get(
      config.embedding.method, _E4E_CMD)
  if not path or not os.path.exists(path):
    raise _missing(path, "generator checkpoint",
                   cmd.format(path=path or "DIR"))
  try:
    return stylegan2.load(path)
  except checkpoint.CheckpointError as e:
    raise UserError(f"{e} (convert with: {cmd.format(path=path)})") from None


def load_id_network(config, face_models):
  """The paper's ID network of config.model.id_network (None when unset);
  its metric needs dlib's landmarks (`face_models`)."""
  path = config.model.get("id_network", "")
  if not path:
    return None
  if not os.path.exists(path):
    raise _missing(path, "ID network checkpoint", _ID_CMD.format(path=path))
  if face_models is None:
    raise UserError("config.model.id_network: the ID metric finds its "
                    "landmarks with dlib; pip install 'dhr_jax[faces]'")
  try:
    return curricularface.load(path)
  except checkpoint.CheckpointError as e:
    raise UserError(f"{e} (convert with: {_ID_CMD.format(path=path)})"
                    ) from None


def load_hfgi(config, G):
  """HFGI of config.model.hfgi, or None (with a warning) when it is unset;
  'stand-in': the demo's for its stand-in generator G
  (`synthetic.stand_in_hfgi`)."""
  path = config.model.get("hfgi", "")
  if not path:
    logging.warning("HFGI left out: config.model.hfgi is not set")
    return None
  if path == "stand-in":
    # Random weights in a real run would pass for HFGI's; never build them
    # for a converted generator.
    if config.model.checkpoint != "stand-in":
      raise UserError(synthetic.HFGI_STAND_IN_ONLY)
    return synthetic.stand_in_hfgi(G, int(config.model.stand_in.seed))
  if not os.path.exists(path):
    raise UserError(f"config.model.hfgi {path!r} not found; convert it with "
                    "python -m converters.hfgi")
  try:
    return hfgi_lib.load(path)
  except checkpoint.CheckpointError as e:
    raise UserError(f"{e} (convert with: python -m converters.hfgi)"
                    ) from None


_PSP_CMD = "python -m converters.encoder --src pSp_ffhq_encode.pt --dst {path}"
_DIFFCAM_CMD = ("python -m converters.diffcam --src diff_cam_weight.pt "
                "--dst {path}")
_DEGHOSTING_CMD = ("python -m converters.deghosting --src deghosting.pt "
                   "--dst {path}")


def _load_converted(key, path, load, command):
  """A converted checkpoint of config.<key>, a missing or wrong one a
  UserError naming its converter."""
  if not path or not os.path.exists(path):
    raise _missing(path or "", f"config.{key}", command.format(
        path=path or "DIR"))
  try:
    return load(path)
  except checkpoint.CheckpointError as e:
    raise UserError(f"config.{key}: {e} (convert with: "
                    f"{command.format(path=path)})") from None


_RESTYLE_CMD = ("python -m converters.encoder --src "
                "restyle_e4e_ffhq_encode.pt --dst {path}")
ENCODER_CMDS = dict(e4e=_E4E_CMD, psp=_PSP_CMD, restyle=_RESTYLE_CMD)


def encoder_command(name):
  """The conversion command of encoder `name` (an architecture or not)."""
  return ENCODER_CMDS.get(name, "python -m converters.encoder --src "
                          "BUNDLE.pt --dst {path}")


def load_encoder(config, G, arch, path, key="model.checkpoint"):
  """The converted encoder of config.<key> = `path`: `arch` ('e4e', 'psp',
  'restyle'; None: any), its codes checked against generator G. A missing
  or wrong one (another architecture, another resolution) is one UserError
  naming what was found and what was expected."""
  command = encoder_command(arch)
  if path == "stand-in" or not path or not os.path.exists(path):
    raise _missing(path, f"{arch or 'encoder'} checkpoint ({key})",
                   command.format(path=path or "DIR"))
  try:
    encoder = encoders.load(path, arch=arch)
  except checkpoint.CheckpointError as e:
    raise UserError(f"{key}: {e} (convert with: "
                    f"{command.format(path=path)})") from None
  try:
    encoders.check_compatible(encoder, G)
  except checkpoint.CheckpointError as e:
    m = config.model
    raise UserError(f"model.generator {m.generator or m.checkpoint!r} does "
                    f"not fit {key} {path!r}: {e}") from None
  return encoder


def load_diffcam_models(config):
  """edit.method='diffcam''s models: (G, pSp encoder, DiffCam, deghosting
  network), their sizes checked against each other."""
  m = config.model
  if m.checkpoint == "stand-in":
    raise UserError("edit.method='diffcam' needs pSp: --config.model."
                    "checkpoint=DIR, " + _PSP_CMD.format(path="DIR"))
  encoder = _load_converted("model.checkpoint", m.checkpoint,
                            lambda p: encoders.load(p, arch="psp"), _PSP_CMD)
  G = load_generator(config)
  try:
    encoders.check_compatible(encoder, G, "psp")
  except checkpoint.CheckpointError as e:
    raise UserError(f"model.generator {m.generator or m.checkpoint!r}: {e}"
                    ) from None
  return (G, encoder) + load_differential_networks(config, G)


def load_differential_networks(config, G):
  """(DiffCam, deghosting network) of config.model.diffcam and
  config.model.deghosting, the deghosting's input size checked against
  generator G's images."""
  m = config.model
  C = _load_converted("model.diffcam", m.get("diffcam", ""),
                      diffcam_lib.load, _DIFFCAM_CMD)
  D = _load_converted("model.deghosting", m.get("deghosting", ""),
                      deghosting_lib.load, _DEGHOSTING_CMD)
  if D.config["in_size"] > G.config["size"]:
    raise UserError(f"config.model.deghosting {m.deghosting!r} takes "
                    f"{D.config['in_size']}² inputs, larger than the "
                    f"{G.config['size']}² generator's images")
  return C, D


def load_compare_encoders(config, models):
  """{name: encoder} of config.compare.encoders (`settings.
  compare_encoders`), replicated, each checked against the generator; a
  name that is an architecture must hold one. 'stand-in': the demo's
  (`synthetic.stand_in_encoder`). A folder that does not exist leaves its
  encoder (and the rows that need it) out with one warning. An entry naming
  the run's own encoder (model.checkpoint, embedding.method) is that
  encoder: its codes are the shared embedding's."""
  G, out = models.G, {}
  for name, path in settings.compare_encoders(config).items():
    key = f"compare.encoders['{name}']"
    arch = name if name in encoders.ARCHS else None
    if path == "stand-in":
      out[name] = synthetic.stand_in_encoder(
          G, name, int(config.model.stand_in.seed))
    elif not os.path.exists(path):
      logging.warning(
          "encoder %r left out with its rows: config.%s %r not found "
          "(convert it: %s)", name, key, path,
          encoder_command(name).format(path=path))
      continue
    elif (models.encoder is not None
          and arch in (None, encoders.arch_of(models.encoder))
          and os.path.realpath(path) == os.path.realpath(
              config.model.checkpoint)):
      out[name] = models.encoder
      continue
    else:
      out[name] = load_encoder(config, G, arch, path, key)
    out[name] = jax.device_put(out[name], _replicated(models.mesh))
  return out


def load_models(config, mesh=None, hfgi=False, compare_encoders=False):
  """Loads every model the config needs (with hfgi: also config.model.hfgi,
  `load_hfgi`; with compare_encoders, the comparison's models:
  `load_compare_encoders`, and with edit.method='diffcam' the DHR run's
  models plus DiffCam and the deghosting network); refuses an encoder
  whose codes do not fit the generator before anything else is loaded."""
  m = config.model
  method = config.embedding.method
  settings.one_of("embedding.method", method, pipeline.EMBEDDINGS)
  # First: a wrong ID network path is found before the big models load.
  id_network = load_id_network(config, face_models(config))
  encoder = parser = C = D = None
  # A diffcam run alone: pSp embeds, no DSS, no parser, no shared
  # embedding. The comparison's Diff-CAM row runs beside DHR's: the run's
  # models, and its pSp is an encoder of them.
  diffcam = (settings.edit_method(config) == "diffcam"
             and not compare_encoders)
  if diffcam:
    G, encoder, C, D = load_diffcam_models(config)
  else:
    G = load_generator(config)
  if method in pipeline.ENCODERS and not diffcam:
    encoder = load_encoder(config, G, method, m.checkpoint)
  if settings.edit_method(config) == "diffcam" and not diffcam:
    C, D = load_differential_networks(config, G)
  path = None if diffcam else settings.parser_path(config)
  if path is not None:
    if not os.path.exists(path):
      cmd = settings.FARL_CMD.format(path=path)
      raise UserError(f"{_missing(path, 'parser checkpoint', cmd)} "
                      f"{_FARL_SOURCE}{_NO_PARSER_HINT}")
    try:
      parser = farl.load(path)
    except checkpoint.CheckpointError as e:
      raise UserError(f"{e} (convert with: "
                      f"{settings.FARL_CMD.format(path=path)}){_NO_PARSER_HINT}"
                      ) from None
  elif m.checkpoint != "stand-in" and not diffcam:
    # The stand-in generator (the demo) makes no faces: nothing to parse.
    logging.warning("%s", settings.no_parser_warning(config))
  try:
    vgg, alex = lpips.load("vgg"), lpips.load("alex")
  except lpips.LPIPSWeightsError as e:
    raise UserError(str(e)) from None
  models = prepare_models(
      G, vgg, alex, encoder=encoder, parser=parser, id_network=id_network,
      seed=int(config.seed), n_mean_latent=int(config.embedding.n_mean_latent),
      mesh=mesh)
  models.diffcam, models.deghosting = jax.device_put(
      (C, D), _replicated(models.mesh))
  if hfgi:
    models.hfgi = load_hfgi(config, G)
  if compare_encoders:
    models.encoders = load_compare_encoders(config, models)
  return models

