"""The package's shape (DESIGN.md, "The stage contract"): stage rooms never import each other,
and configs are data (they import nothing of fedllava)."""

import ast
import glob
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STAGE_ROOMS = {
  "federate": "fedllava/federate",
  "align": "fedllava/align",
  "pretrain": "fedllava/pretrain",
}


def _imports(path):
  tree = ast.parse(open(path, encoding="utf-8").read())
  out = set()
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      out |= {a.name for a in node.names}
    elif isinstance(node, ast.ImportFrom) and node.module:
      out.add(node.module)
      out |= {f"{node.module}.{a.name}" for a in node.names}
  return out


def _files(room):
  path = os.path.join(ROOT, room)
  return (
    [path] if path.endswith(".py") else glob.glob(os.path.join(path, "**/*.py"), recursive=True)
  )


def test_stage_rooms_never_import_each_other():
  for name, room in STAGE_ROOMS.items():
    others = [f"fedllava.{o}" for o in STAGE_ROOMS if o != name]
    for path in _files(room):
      bad = [m for m in _imports(path) if any(m == o or m.startswith(o + ".") for o in others)]
      assert not bad, f"{os.path.relpath(path, ROOT)} imports {bad}"


def test_only_main_chains_the_stages():
  for path in glob.glob(os.path.join(ROOT, "fedllava/**/*.py"), recursive=True):
    rel = os.path.relpath(path, ROOT)
    if rel == "fedllava/main.py" or any(rel.startswith(r) for r in STAGE_ROOMS.values()):
      continue
    bad = [m for m in _imports(path) if any(m.startswith(f"fedllava.{s}") for s in STAGE_ROOMS)]
    assert not bad, f"{rel} (shared code) imports a stage: {bad}"


def test_configs_import_nothing_of_fedllava():
  for path in glob.glob(os.path.join(ROOT, "configs/*.py")):
    mods = _imports(path)
    assert not [m for m in mods if m.startswith("fedllava")], path
    assert mods <= {
      "__future__",
      "__future__.annotations",
      "ml_collections",
      "configs",
      "configs.common",
    }, (
      path,
      mods,
    )
