"""No module reaches a private name of another project module (issue 22).

Walks the AST of the model files, the numerical core, converters/ and
bench/: `from dhr_jax.x import _y` and `x._y` where x is an imported project
module both fail. (The run layer joins the list once it is restructured.)
"""
import ast
import glob
import os

from conftest import REPO

PROJECT = ("dhr_jax", "converters", "conftest", "test_")
CHECKED = (["dhr_jax/models/*.py", "converters/*.py", "bench/*.py"]
           + [f"dhr_jax/{m}.py" for m in (
               "alignment", "checkpoint", "config_files", "embedding",
               "faces", "identity", "metrics", "optim", "photos", "refine",
               "segmentation")])


def _private(name):
  return name.startswith("_") and not name.startswith("__")


def _violations(path):
  with open(path) as f:
    tree = ast.parse(f.read(), path)
  modules, found = set(), []
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      for a in node.names:
        if a.name.startswith(PROJECT):
          modules.add(a.asname or a.name.split(".")[0])
    elif isinstance(node, ast.ImportFrom) and node.module and (
        node.module.startswith(PROJECT)):
      for a in node.names:
        if _private(a.name):
          found.append(f"{path}:{node.lineno} from {node.module} import "
                       f"{a.name}")
        else:
          modules.add(a.asname or a.name)  # may be a module (from x import m)
  for node in ast.walk(tree):
    if (isinstance(node, ast.Attribute) and _private(node.attr)
        and isinstance(node.value, ast.Name) and node.value.id in modules):
      found.append(f"{path}:{node.lineno} {node.value.id}.{node.attr}")
  return found


def test_no_private_names_across_modules():
  paths = sorted(p for pattern in CHECKED
                 for p in glob.glob(os.path.join(REPO, pattern)))
  assert len(paths) > 20
  found = [v for p in paths for v in _violations(p)]
  assert not found, "\n".join(found)


def test_the_check_sees_both_forms(tmp_path):
  bad = tmp_path / "bad.py"
  bad.write_text("from dhr_jax.refine import _x\nfrom dhr_jax.models import "
                 "ops\nops._conv(1)\nimport torch\ntorch._utils\n")
  assert [v.split(" ", 1)[1] for v in _violations(str(bad))] == [
      "from dhr_jax.refine import _x", "ops._conv"]
