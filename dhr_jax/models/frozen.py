"""Hashable, read-only model configs: the static half of a model pytree.

A model here is a pytree whose arrays (params, noise, ...) are leaves and
whose architecture config is static metadata. jax compares the static part
of two pytrees by `==` and `hash` to decide whether a compiled program can be
reused, so the config must be hashable and must not change after the model
is built. A plain dict is neither.

`FrozenConfig` is a dict subclass: `config["size"]`, `config["channels"]
["64"]`, `dict(config)` and `json.dumps(config)` keep working, while item
assignment raises and `hash` is defined by the contents. Nested dicts become
FrozenConfigs and lists become tuples (configs read back from JSON have
lists).
"""


def freeze(value):
  """`value` with every dict made a FrozenConfig and every list a tuple."""
  if isinstance(value, FrozenConfig):
    return value
  if isinstance(value, dict):
    return FrozenConfig(value)
  if isinstance(value, (list, tuple)):
    return tuple(freeze(v) for v in value)
  return value


def _read_only(self, *args, **kwargs):
  raise TypeError("a model config is read-only (it is static data of a "
                  "pytree); build a new model with the changed config")


class FrozenConfig(dict):
  """An immutable, hashable dict (see the module doc)."""

  def __init__(self, *args, **kwargs):
    items = dict(*args, **kwargs)
    super().__init__((k, freeze(v)) for k, v in items.items())
    self._hash = None

  def __hash__(self):
    if self._hash is None:
      self._hash = hash(tuple(sorted(self.items(), key=lambda kv: str(kv[0]))))
    return self._hash

  def __reduce__(self):
    # pickle/copy would otherwise refill the dict through __setitem__.
    return (FrozenConfig, (dict(self),))

  def __repr__(self):
    return f"FrozenConfig({dict.__repr__(self)})"

  __setitem__ = __delitem__ = _read_only
  clear = pop = popitem = setdefault = update = _read_only
  __ior__ = _read_only
