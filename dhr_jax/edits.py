"""Edits as a run configures them: config.edit → `EditSpec`s.

`from_config` is the one reader of config.edit: the CLI renders its specs
for every image (`render_edits`), and the browser editor's sliders are a
view of the same specs (`sliders`). The edit maths (directions, GANSpace,
layer masks, rendering) is `dhr_jax.editing`'s.

config.edit's strings: strengths '-3,0,3'; layers '' / 'all', 'first:last'
(half-open) or 'i,j,k'; directions 'name=path,name2=path2'; GANSpace edits
'component,first,last,strength; ...' ('+' joins tuples into one edit).
"""
import dataclasses
import os
from typing import Any, Callable

import jax.numpy as jnp
import numpy as np

from dhr_jax import differential
from dhr_jax import directions as directions_lib
from dhr_jax import editing
from dhr_jax.editing import EditError
from dhr_jax.models import diffcam
from dhr_jax.settings import UserError


@dataclasses.dataclass(frozen=True)
class EditSpec:
  """One named edit: `fn(codes (B, L, D)) → (B, S, L, D)`, with one output
  label per edited code (used as the file name `edits/<label>.png`).

  kind 'interfacegan' (`direction`, `strengths`, `layers`), 'ganspace'
  (`pcs`, `groups`: per output a list of (component, first, last,
  strength), `mode`) or 'diffcam' (`direction`, `strengths` (α,), `target`
  its DiffCam class): what the edit is made of, for the sliders' view.
  """
  name: str
  labels: tuple
  fn: Callable = dataclasses.field(compare=False)
  kind: str = "interfacegan"
  direction: Any = dataclasses.field(default=None, compare=False)
  strengths: tuple = ()
  layers: Any = None
  pcs: Any = dataclasses.field(default=None, compare=False)
  groups: tuple = ()
  mode: str = "add"
  target: Any = None


def format_strength(s):
  """3.0 → '3', -1.5 → '-1.5' (file-name friendly, stable)."""
  return f"{float(s):g}"


def interfacegan(name, direction, strengths, layers=None):
  """InterFaceGAN edit w + α·n for every α (see `editing.edit_codes`)."""
  strengths = tuple(float(s) for s in strengths)
  direction = np.asarray(direction, np.float32)
  return EditSpec(
      name, tuple(f"{name}_{format_strength(s)}" for s in strengths),
      lambda codes: editing.edit_codes(codes, direction, strengths, layers),
      kind="interfacegan", direction=direction, strengths=strengths,
      layers=layers)


def ganspace(name, pcs, edits, mode="add"):
  """GANSpace layer-wise edits (see `editing.ganspace_edit`); one output per
  edit, labelled `<name>_<component>_<first>-<last>_<strength>`."""
  labels = []
  groups = []
  for e in edits:
    group = [e] if np.isscalar(e[0]) else list(e)
    groups.append(tuple(tuple(t) for t in group))
    labels.append(name + "_" + "+".join(
        f"{int(c)}_{int(a)}-{int(b)}_{format_strength(s)}"
        for c, a, b, s in group))
  edits = list(edits)
  return EditSpec(name, tuple(labels),
                  lambda codes: editing.ganspace_edit(codes, pcs, edits, mode),
                  kind="ganspace", pcs=pcs, groups=tuple(groups), mode=mode)


def random_direction(seed, style_dim):
  """A seeded random unit direction in W (the demo's stand-in attribute)."""
  n = np.random.RandomState(seed).standard_normal(style_dim)
  return (n / np.linalg.norm(n)).astype(np.float32)


# --------------------------------------------------------------------------
# config.edit


def _directions(edit_config, G):
  """config.edit's InterFaceGAN directions → [(name, direction)]: those of
  edit.directions ("name=path,..."), then the seeded 'random' one when
  edit.random_direction_seed ≥ 0. Raises UserError for a bad entry."""
  e = edit_config
  out = []
  try:
    for item in str(e.directions).split(","):
      if not item.strip():
        continue
      if "=" not in item:
        raise UserError(f"config.edit.directions: expected name=path, got "
                        f"{item.strip()!r}")
      name, path = (x.strip() for x in item.split("=", 1))
      out.append((name, directions_lib.load_direction(path)))
  except EditError as err:
    raise UserError(f"config.edit: {err}") from None
  if int(e.random_direction_seed) >= 0:
    out.append(("random", random_direction(
        int(e.random_direction_seed), G.config["style_dim"])))
  return out


def diffcam_edit(name, direction, target, alpha):
  """The differential-activation edit w + α·d/‖d‖ (`differential`) of a
  direction whose DiffCam class is `target`; label '<name>_<α>'."""
  direction = np.asarray(direction, np.float32)
  unit = differential.unit_direction(direction)
  return EditSpec(
      name, (f"{name}_{format_strength(alpha)}",),
      lambda codes: (codes + float(alpha) * unit)[:, None],
      kind="diffcam", direction=direction, strengths=(float(alpha),),
      target=int(target))


def _direction_class(name, num_classes):
  """'Smiling' → its published class; 'name:7' → 7 (checked against the
  DiffCam's `num_classes` when known)."""
  name, _, given = name.partition(":")
  if not given:
    try:
      return name, diffcam.direction_class(name)
    except ValueError as err:
      raise UserError(f"config.edit.directions: {err} Or give the class: "
                      f"{name}:CLASS=file.npy") from None
  try:
    target = int(given)
  except ValueError:
    target = -1
  if target < 0 or (num_classes is not None and target >= num_classes):
    top = "" if num_classes is None else f" below {num_classes}"
    raise UserError(f"config.edit.directions: {name}:{given}: the class "
                    f"must be a whole number ≥ 0{top} (DiffCam's classes)")
  return name, target


def diffcam_specs(edit_config, G, num_classes=None):
  """config.edit of edit.method='diffcam' → [EditSpec] of kind 'diffcam':
  one per "name=path" (name a published direction) or "name:class=path",
  at strength config.edit.alpha."""
  e = edit_config
  if e.ganspace or e.ganspace_edits:
    raise UserError("config.edit.ganspace: edit.method='diffcam' edits "
                    "along directions with a DiffCam class; unset it")
  if int(e.random_direction_seed) >= 0:
    raise UserError("config.edit.random_direction_seed: a random direction "
                    "has no DiffCam class; set it to -1 and give "
                    "--config.edit.directions=name:class=file.npy")
  want = (G.n_latent, G.config["style_dim"])
  out = []
  for label, direction in _directions(e, G):
    name, target = _direction_class(label, num_classes)
    if direction.shape not in (want, want[1:]):
      raise UserError(f"config.edit.directions: {label} has shape "
                      f"{direction.shape}; the generator takes {want} (or "
                      f"({want[1]},))")
    out.append(diffcam_edit(name, direction, target, float(e.alpha)))
  if not out:
    raise UserError("edit.method='diffcam' needs directions: "
                    "--config.edit.directions=Smiling=directions/Smiling.npy "
                    "(the published ones) or name:class=file.npy")
  return out


def _unique(specs):
  # Edits are written by label: two of one label would overwrite each other.
  labels = [l for spec in specs for l in spec.labels]
  if len(set(labels)) != len(labels):
    raise UserError(f"config.edit gives two edits the same name: {labels}")
  return specs


def from_config(edit_config, G, num_classes=None):
  """config.edit → [EditSpec]: the InterFaceGAN directions, the GANSpace
  edits, then the random direction (the one reader of config.edit:
  the CLI renders these specs, the app's sliders are a view of them); with
  edit.method='diffcam' its edits (`diffcam_specs`, num_classes: the
  DiffCam's)."""
  e = edit_config
  if e.get("method", "dhr") == "diffcam":
    return _unique(diffcam_specs(e, G, num_classes))
  directions = _directions(e, G)
  n_given = len(directions) - (int(e.random_direction_seed) >= 0)
  try:
    strengths = parse_strengths(e.strengths)
    layers = parse_layers(e.layers)
    out = [interfacegan(name, n, strengths, layers)
           for name, n in directions[:n_given]]
    if e.ganspace:
      pcs = directions_lib.load_ganspace(e.ganspace)
      name = os.path.splitext(os.path.basename(e.ganspace))[0]
      out.append(ganspace(
          name, pcs, parse_ganspace_edits(e.ganspace_edits),
          e.ganspace_mode))
    elif e.ganspace_edits:
      raise UserError("config.edit.ganspace_edits needs config.edit.ganspace "
                      "(the components file)")
    out += [interfacegan(name, n, strengths, layers)
            for name, n in directions[n_given:]]
  except EditError as err:
    raise UserError(f"config.edit: {err}") from None
  _unique(out)
  # Shapes are checked now, on a dummy code, not after an hour of refinement.
  probe = jnp.zeros((1, G.n_latent, G.config["style_dim"]), jnp.float32)
  for spec in out:
    try:
      spec.fn(probe)
    except EditError as err:
      raise UserError(f"config.edit ({spec.name}): {err}") from None
  return out


def parse_strengths(text):
  """'-3,0,3' → [-3.0, 0.0, 3.0]."""
  try:
    values = [float(x) for x in str(text).split(",") if x.strip()]
  except ValueError:
    raise EditError(f"strengths must be comma-separated numbers, got "
                    f"{text!r}") from None
  if not values:
    raise EditError("no strengths given")
  return values


def parse_layers(text):
  """'' / 'all' → None;  '4:8' → (4, 8) half-open;  '0,2,5' → [0, 2, 5]."""
  text = "" if text is None else str(text).strip()
  try:
    if text in ("", "all"):
      return None
    if ":" in text:
      first, last = text.split(":")
      return (int(first), int(last))
    return [int(x) for x in text.split(",")]
  except ValueError:
    raise EditError(f"layers must be 'all', 'first:last' (half-open) or "
                    f"'i,j,k', got {text!r}") from None


def parse_ganspace_edits(text):
  """'54,7,8,20; 46,4,5,-20' → two edits; '+' joins tuples into one edit.

  Each tuple is component,first,last,strength with layers first:last.
  """
  edits = []
  for part in str(text).split(";"):
    if not part.strip():
      continue
    group = []
    for tup in part.split("+"):
      fields = [x.strip() for x in tup.split(",")]
      try:
        if len(fields) != 4:
          raise ValueError
        c, first, last = (int(x) for x in fields[:3])
        group.append((c, first, last, float(fields[3])))
      except ValueError:
        raise EditError(f"a GANSpace edit is 'component,first,last,strength'"
                        f", got {tup.strip()!r}") from None
    edits.append(group[0] if len(group) == 1 else group)
  if not edits:
    raise EditError("no GANSpace edits given")
  return edits


# --------------------------------------------------------------------------
# Codes and images


def codes_of(edits, codes):
  """Every edit of codes (B, L, D) → (codes (B, S, L, D), S labels)."""
  edited = jnp.concatenate([e.fn(codes) for e in edits], axis=1)
  labels = [l for e in edits for l in e.labels]
  if edited.shape[1] != len(labels):
    raise EditError(f"edits produced {edited.shape[1]} codes for "
                        f"{len(labels)} labels")
  return edited, labels


def render_edits(G, refined, edits):
  """{label: (H, W, 3) float image} of every edit of ONE refined inversion.

  refined: a `refine.Refinement` of one image, `result[i]` of the run's
  refinement or `refine.load_refined`; both hold bit-identical arrays, so
  editing during a run and re-editing a saved workdir render the same
  images (one program, the same inputs).
  """
  if not edits:
    return {}
  codes, labels = codes_of(edits, refined.codes)
  images = np.asarray(editing.render(G, refined, codes)[0])
  return {l: images[j] for j, l in enumerate(labels)}


def generator_edits(G, codes, edits):
  """{label: image} of every edit of ONE image's codes (1, L, D), rendered
  by the generator itself (no refinement)."""
  if not edits:
    return {}
  codes, labels = codes_of(edits, jnp.asarray(codes, jnp.float32))
  images = np.asarray(editing.render(G, None, codes)[0])
  return {l: images[j] for j, l in enumerate(labels)}


# --------------------------------------------------------------------------
# Sliders: the browser editor's view of the specs


@dataclasses.dataclass(frozen=True)
class Slider:
  """One edit the page offers as a slider.

  kind 'interfacegan': `direction` (D,) or (L, D), moved by α along the
  chosen layer range; kind 'ganspace': `pcs` with the edit group's
  (component, first, last) tuples, α replacing their configured strength;
  kind 'diffcam': `direction` and its DiffCam class `target`, α the
  strength of the differential edit (`differential`) of all layers.
  `limit`: the slider runs over [-limit, limit]; `value`: where it starts
  (0, no edit; a diffcam slider at its configured α).
  """
  name: str
  kind: str
  limit: float
  direction: object = None
  pcs: object = None
  group: tuple = ()
  mode: str = "add"
  target: object = None
  value: float = 0.0


# A diffcam slider's range, unless the configured α is larger: 1.5 times
# the published default α = 20 either way. The published code only edits at
# +20; the negative half is the reverse edit (e.g. less smile), which DHR's
# sliders offer too, and DiffCam then maps where the difference still reads
# as the class (possibly nowhere: the page says when the map is empty).
# Farther out the codes leave the neighbourhood of W the edit directions
# were fitted in (a judgement, not a measurement).
DIFFCAM_LIMIT = 30.0


def sliders(specs):
  """[Slider] of `from_config`'s specs: one per InterFaceGAN direction (its
  range the largest configured strength), then one per GANSpace edit (its
  component file's stem and layers; range its largest strength), then one
  per differential-activation edit (edit.method='diffcam')."""
  out = [Slider(s.name, "interfacegan",
                max(abs(a) for a in s.strengths) or 1.0,
                direction=s.direction)
         for s in specs if s.kind == "interfacegan"]
  for s in specs:
    if s.kind != "ganspace":
      continue
    for group in s.groups:
      label = s.name + " " + "+".join(f"{c} [{a}:{b}]"
                                      for c, a, b, _ in group)
      out.append(Slider(label, "ganspace",
                        max(abs(x) for *_, x in group) or 1.0, pcs=s.pcs,
                        group=tuple((c, a, b) for c, a, b, _ in group),
                        mode=s.mode))
  out += [Slider(s.name, "diffcam", max(DIFFCAM_LIMIT, abs(s.strengths[0])),
                 direction=s.direction, target=s.target,
                 value=s.strengths[0])
          for s in specs if s.kind == "diffcam"]
  return out


def slider_codes(codes, sliders, values, layers):
  """The refined codes (1, L, D) moved by every slider with α ≠ 0, in turn.

  layers: (first, last) half-open, for the InterFaceGAN sliders. A slider
  at 0 leaves the codes untouched (also in GANSpace 'set' mode)."""
  codes = jnp.asarray(codes)
  for s, alpha in zip(sliders, values):
    alpha = float(alpha)
    if alpha == 0:
      continue
    if s.kind == "interfacegan":
      codes = editing.edit_codes(codes, s.direction, [alpha], layers)[:, 0]
    else:
      group = [(c, a, b, alpha) for c, a, b in s.group]
      codes = editing.ganspace_edit(codes, s.pcs, [group], s.mode)[:, 0]
  return codes
