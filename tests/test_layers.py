"""The package's one-way layers, its import cycles and how light `import devinterp_jax` is.

Read from the source (every `import` statement, function-level ones included), so a
lazy import cannot hide an upward dependency.
"""

import ast
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "devinterp_jax"

# Modules every layer may import: files and the distributed-runtime / path helpers,
# exact learning coefficients, shared types, progress lines and config-rule checks.
GROUND = {"atomic", "theory", "typing", "multihost", "paths", "progress", "config_checks"}

# What each package may import beyond the ground layer and itself.
ALLOWED = {
  "data": set(),
  "models": set(),
  "storage": set(),
  "training": {"storage"},
  "sampling": {"storage"},
  "viz": {"sampling"},
  "analysis": {"sampling", "storage", "models", "data", "viz"},
  "experiments": {"data", "models", "storage", "training", "sampling", "viz", "analysis"},
}
TOP = {"configs": {"experiments"}, "launch": {"experiments"}}
# viz may use sampling's result and diagnostic types only.
VIZ_FROM_SAMPLING = {"devinterp_jax.sampling.results", "devinterp_jax.sampling.diagnostics"}


def _module_name(path: pathlib.Path) -> str:
  rel = path.relative_to(ROOT).with_suffix("")
  parts = list(rel.parts)
  if parts[-1] == "__init__":
    parts = parts[:-1]
  return ".".join(parts)


def _imports(tree: ast.AST) -> list[tuple[int, str]]:
  """(line, module) of every devinterp_jax import under `tree`, `from X import y`
  giving X.y when X.y is a module and X otherwise."""
  out = []
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      out += [(node.lineno, a.name) for a in node.names if a.name.startswith("devinterp_jax")]
    elif (
      isinstance(node, ast.ImportFrom)
      and node.level == 0
      and node.module
      and node.module.startswith("devinterp_jax")
    ):
      for a in node.names:
        sub = ROOT / pathlib.Path(*f"{node.module}.{a.name}".split("."))
        is_module = sub.with_suffix(".py").exists() or (sub / "__init__.py").exists()
        out.append((node.lineno, f"{node.module}.{a.name}" if is_module else node.module))
  return out


def _file_imports(path: pathlib.Path) -> list[tuple[int, str]]:
  return _imports(ast.parse(path.read_text(), str(path)))


def _layer(module: str) -> str | None:
  """The package of a devinterp_jax module ('sampling'), 'ground', or None for the
  package root."""
  parts = module.split(".")
  if len(parts) == 1:
    return None
  return "ground" if parts[1] in GROUND else parts[1]


def _violations() -> list[str]:
  bad = []
  files = sorted(PACKAGE.rglob("*.py"))
  for path in files:
    me = _layer(_module_name(path))
    for line, target in _file_imports(path):
      them = _layer(target)
      where = f"{path.relative_to(ROOT)}:{line} imports {target}"
      if me is None or them in (None, "ground") or them == me:
        if me == "ground" and them not in (None, "ground"):
          bad.append(f"{where}: the ground layer imports no package")
        continue
      if me == "ground":
        bad.append(f"{where}: the ground layer imports no package")
      elif them not in ALLOWED.get(me, set()):
        bad.append(f"{where}: {me} may not import {them}")
      elif me == "viz" and them == "sampling" and target not in VIZ_FROM_SAMPLING:
        bad.append(f"{where}: viz may import only sampling's result types")
  for top, allowed in TOP.items():
    for path in sorted((ROOT / top).glob("*.py")):
      for line, target in _file_imports(path):
        them = _layer(target)
        if them not in allowed | {"ground", None}:
          bad.append(
            f"{path.relative_to(ROOT)}:{line} imports {target}: {top} may import "
            f"only {sorted(allowed)}"
          )
  return bad


def test_layers_import_one_way():
  bad = _violations()
  assert not bad, "upward or sideways imports:\n" + "\n".join(bad)


def _module_graph() -> dict[str, set[str]]:
  """Every import, function-level ones included: two modules that need each other are
  one module in two files, whenever each import runs. A package's `__init__`
  importing its own submodules is left out (a submodule loads its package first)."""
  graph = {}
  for path in sorted(PACKAGE.rglob("*.py")):
    name = _module_name(path)
    own = name + "." if path.name == "__init__.py" else None
    graph[name] = {
      t for _, t in _file_imports(path) if t != name and not (own and t.startswith(own))
    }
  return graph


def test_no_import_cycles():
  graph = _module_graph()
  cycles, state = [], {}

  def visit(node, stack):
    state[node] = "open"
    for dep in sorted(graph.get(node, ())):
      if dep not in graph:
        continue
      if state.get(dep) == "open":
        cycles.append(" -> ".join(stack[stack.index(dep) :] + [dep]))
      elif dep not in state:
        visit(dep, stack + [dep])
    state[node] = "done"

  for node in sorted(graph):
    if node not in state:
      visit(node, [node])
  assert not cycles, "import cycles:\n" + "\n".join(cycles)


def test_the_package_import_is_light():
  """`import devinterp_jax` loads neither matplotlib, scikit-learn nor scipy, and no
  module selects a matplotlib backend (a notebook keeps its inline plots)."""
  code = (
    "import sys, devinterp_jax; heavy = [m for m in ('matplotlib', 'sklearn', 'scipy') "
    "if m in sys.modules]; print(heavy); sys.exit(1 if heavy else 0)"
  )
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, (
    f"import devinterp_jax loads {out.stdout.strip()} {out.stderr[-2000:]}"
  )
  offenders = [
    str(p.relative_to(ROOT))
    for p in PACKAGE.rglob("*.py")
    if "matplotlib.use(" in p.read_text()
    or "import matplotlib.pyplot" in p.read_text()
    or "from matplotlib import pyplot" in p.read_text()
  ]
  assert not offenders, f"pyplot state or backend selection in {offenders}"


@pytest.mark.parametrize("package", sorted(ALLOWED))
def test_each_package_imports_alone(package):
  """Every package imports in a fresh process by itself (no hidden import order)."""
  code = f"import devinterp_jax.{package}"
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-2000:]
