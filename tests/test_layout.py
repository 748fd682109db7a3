"""The package layout that docs/design.md states: role subpackages in layers,
imports pointing one way (down), no cycle, a thin top level.

Every `import` of retro_jax code is read from the source with `ast`, those
inside functions included (a deferred import is still a dependency).
"""

import ast
import os

from conftest import REPO_ROOT

PACKAGE = os.path.join(REPO_ROOT, "retro_jax")

# Lowest first. A module may import its own role package and roles of lower
# layers only; two roles of one layer do not import each other. The top-level
# `retro_jax/__init__.py` is the public face and may import any role.
LAYERS = (
    ("config", "core"),      # model hyperparameters, token ids; files, mesh
    ("corpus", "model"),     # documents and vocabularies; the network
    ("retrieval",),          # frozen BERT, chunk DB, index, neighbours
    ("data",),               # seqio Tasks, neighbour cache, batches
    ("training",),           # step, loop, checkpoints, RETROfit
    ("evaluation",),         # scores, leakage, evaluation job
    ("inference",),          # retro_jax.load, sampling
)
RANK = {role: i for i, layer in enumerate(LAYERS) for role in layer}
TOP_LEVEL_FILES = {"__init__.py", "config.py"}


def _role(dotted: str) -> str:
  """'retro_jax.model.network' -> 'model'; 'retro_jax.config' -> 'config'."""
  parts = dotted.split(".")
  return parts[1] if len(parts) > 1 else ""


def _imports(path: str, module: str):
  """(line, imported retro_jax module or package) for every import."""
  tree = ast.parse(open(path, encoding="utf-8").read(), path)
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      for alias in node.names:
        if alias.name.startswith("retro_jax"):
          yield node.lineno, alias.name
    elif isinstance(node, ast.ImportFrom) and node.module:
      base = node.module
      if node.level:  # Relative: resolve against this module's package.
        pkg = module.split(".")[:-node.level]
        base = ".".join(pkg + [node.module])
      if base.startswith("retro_jax"):
        if base == "retro_jax":  # from retro_jax import x: x is the target.
          for alias in node.names:
            yield node.lineno, f"retro_jax.{alias.name}"
        else:
          yield node.lineno, base


def _modules():
  for root, _, names in os.walk(PACKAGE):
    for name in sorted(names):
      if name.endswith(".py"):
        path = os.path.join(root, name)
        rel = os.path.relpath(path, REPO_ROOT)[:-3].replace(os.sep, ".")
        yield path, rel.removesuffix(".__init__")


def test_top_level_holds_only_the_public_face_and_model_config():
  files = {n for n in os.listdir(PACKAGE) if n.endswith(".py")}
  assert files == TOP_LEVEL_FILES
  packages = {n for n in os.listdir(PACKAGE)
              if os.path.isfile(os.path.join(PACKAGE, n, "__init__.py"))}
  assert packages == set(RANK) - {"config"}, (
      "every role package is placed in LAYERS (and docs/design.md)")


def test_imports_point_down_the_layers():
  wrong = []
  for path, module in _modules():
    if module == "retro_jax":
      continue
    own = _role(module)
    for line, target in _imports(path, module):
      other = _role(target)
      if other == own or other in ("", "__version__"):
        continue
      if other not in RANK:
        wrong.append(f"{path}:{line} imports {target}, a public-face name "
                     f"(import it from its role package)")
      elif RANK[other] >= RANK[own]:
        wrong.append(f"{path}:{line}: {own} (layer {RANK[own]}) imports "
                     f"{target} (layer {RANK[other]})")
  assert not wrong, "\n".join(wrong)


def test_the_checker_sees_a_wrong_import(tmp_path):
  """The walker finds a deferred upward import inside a function."""
  src = tmp_path / "m.py"
  src.write_text("def f():\n  from retro_jax.inference import run\n")
  assert list(_imports(str(src), "retro_jax.model.m")) == [
      (2, "retro_jax.inference")]
  assert RANK["inference"] > RANK["model"]


def test_design_doc_states_the_layers():
  """docs/design.md names every role in the order LAYERS has them."""
  text = open(os.path.join(REPO_ROOT, "docs", "design.md"),
              encoding="utf-8").read()
  positions = [text.find(f"`{role}/`") if role != "config" else
               text.find("`config.py`") for layer in LAYERS for role in layer]
  assert all(p >= 0 for p in positions), positions


def _is_slow(decorators) -> bool:
  return any("slow" in ast.unparse(d) for d in decorators)


def _fast_test_files():
  """Test files with at least one test not marked slow, and the retro_jax
  modules each imports."""
  tests_dir = os.path.join(REPO_ROOT, "tests")
  for root, _, names in os.walk(tests_dir):
    for name in names:
      if not (name.startswith("test_") and name.endswith(".py")):
        continue
      path = os.path.join(root, name)
      tree = ast.parse(open(path, encoding="utf-8").read(), path)
      marked = any(isinstance(n, ast.Assign) and "pytestmark" in ast.unparse(n)
                   and "slow" in ast.unparse(n) for n in tree.body)
      fast = not marked and any(
          isinstance(n, ast.FunctionDef) and n.name.startswith("test_")
          and not _is_slow(n.decorator_list) for n in tree.body)
      if fast:
        modules = set()
        for node in ast.walk(tree):
          if isinstance(node, ast.ImportFrom) and node.module and (
              node.module.startswith("retro_jax")):
            modules.add(node.module)
            modules.update(f"{node.module}.{a.name}" for a in node.names)
          elif isinstance(node, ast.Import):
            modules.update(a.name for a in node.names)
        yield path, modules


def test_every_module_has_a_fast_test():
  """Each module of the package is imported by a test file that has a test
  outside the slow tier, so `pytest -m "not slow"` exercises all of them."""
  imported = set()
  for _, modules in _fast_test_files():
    imported |= modules
  untested = [module for path, module in _modules()
              if not path.endswith("__init__.py") and module not in imported]
  assert not untested, untested
