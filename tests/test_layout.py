"""The code's layout rules: no module reaches another's private names.

Walks the syntax trees of dhr_jax/, converters/, bench/ and run.py and
fails on `from x import _y`, `import x._y` and `x._y` where x is a name
bound by an import (another module, or an object from one). A module's own
privates, `self._y` and dunder names are fine; tests may use private
helpers. The only exemptions are third-party privates that have no public
route, each listed below with where it is allowed and why (converters/
nvidia_pickle.py names torch's unpickling hooks only as strings, which
this does not count).
"""
import ast
import os

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# (file, private name) → why it is allowed. Third-party only.
ALLOWED = {
    # The coordination service's client (key-value store, barriers) has no
    # public alias; one function (`distributed.coordination`) reaches it.
    ("dhr_jax/distributed.py", "_src"): "jax's coordination client",
}


def _private(name):
  return name.startswith("_") and not name.startswith("__")


def _files(*roots):
  for root in roots:
    path = os.path.join(REPO, root)
    if os.path.isfile(path):
      yield root
      continue
    for folder, _, names in os.walk(path):
      for n in sorted(names):
        if n.endswith(".py"):
          yield os.path.relpath(os.path.join(folder, n), REPO)


def private_uses(rel, root=REPO):
  """[(line, text)] of every reach into another module's private names."""
  tree = ast.parse(open(os.path.join(root, rel)).read(), rel)
  imported = set()  # names bound by imports: modules and their objects
  found = []
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      for a in node.names:
        imported.add(a.asname or a.name.split(".")[0])
        parts = a.name.split(".")
        found += [(node.lineno, f"import {a.name}")
                  for p in parts[1:] if _private(p)]
    elif isinstance(node, ast.ImportFrom):
      module = node.module or ""
      found += [(node.lineno, f"from {module} import ...")
                for p in module.split(".") if _private(p)]
      for a in node.names:
        imported.add(a.asname or a.name)
        if _private(a.name):
          found.append((node.lineno, f"from {module} import {a.name}"))
  for node in ast.walk(tree):
    if (isinstance(node, ast.Attribute) and _private(node.attr)
        and isinstance(node.value, ast.Name) and node.value.id in imported):
      found.append((node.lineno, f"{node.value.id}.{node.attr}"))
  out = []
  for line, text in found:
    if any(rel == f and n in text for f, n in ALLOWED):
      continue
    out.append((line, text))
  return out


def _report(roots):
  bad = [f"{rel}:{line}: {text}" for rel in _files(*roots)
         for line, text in private_uses(rel)]
  assert not bad, "private names of other modules:\n" + "\n".join(bad)


def test_package_converters_and_run_use_no_private_names_of_others():
  _report(["dhr_jax", "converters", "run.py"])


def test_bench_uses_no_private_names_of_others():
  _report(["bench"])


def test_the_one_private_jax_use_is_one_function_with_its_reason():
  rel = "dhr_jax/distributed.py"
  source = open(os.path.join(REPO, rel)).read()
  tree = ast.parse(source)
  uses = [f.name for f in ast.walk(tree) if isinstance(f, ast.FunctionDef)
          for n in ast.walk(f) if isinstance(n, ast.ImportFrom)
          and "_src" in (n.module or "")]
  assert uses == ["coordination"]
  assert source.count("jax._src") == 1
  # Nowhere else in the package.
  for other in _files("dhr_jax", "converters", "run.py"):
    if other != rel:
      assert "jax._src" not in open(os.path.join(REPO, other)).read(), other


def test_checker_finds_what_it_should(tmp_path):
  (tmp_path / "m.py").write_text(
      "from dhr_jax.runner import _lock\n"
      "from dhr_jax import pipeline\n"
      "import jax._src.distributed\n"
      "pipeline._refine(1)\n"
      "self._ok = 1\n"
      "def _mine():\n  return _mine\n")
  got = [t for _, t in private_uses("m.py", str(tmp_path))]
  assert got == ["from dhr_jax.runner import _lock",
                 "import jax._src.distributed", "pipeline._refine"]


@pytest.mark.parametrize("module", [
    "runner", "loop", "methods", "pipeline", "compare", "app", "editor",
    "edits", "editing", "directions", "workdir", "io", "files", "pictures",
    "settings", "loading", "lock", "distributed", "cli", "synthetic",
    "photos"])
def test_run_layer_modules_stay_small(module):
  """No run-layer module over ~450 lines; the run entry under ~300."""
  n = len(open(os.path.join(REPO, "dhr_jax", module + ".py")).readlines())
  assert n <= (300 if module == "runner" else 450), n
