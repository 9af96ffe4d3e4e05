"""The layering of the package (docs/architecture.md): imports point down, never into the apps.

Every module is parsed (not imported), so a violation fails here whatever is installed.
"""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "jaxquant"

#: The core's layers, lowest first: a module may import only from its own layer or below.
LAYERS = (
  ("jaxquant._version", "jaxquant.spec"),
  ("jaxquant.packing",),
  ("jaxquant.qarray",),
  ("jaxquant.calibration",),
  ("jaxquant.numerics",),
  ("jaxquant.learned",),
  ("jaxquant.rules",),
  ("jaxquant.transforms",),
  ("jaxquant.io",),
  ("jaxquant.interop", "jaxquant.gguf_io"),
  ("jaxquant.ops",),
  ("jaxquant.flax",),
  ("jaxquant.ptq",),
  ("jaxquant.mixed",),
  ("jaxquant.training",),
  ("jaxquant.recipes",),
  ("jaxquant.export",),
  ("jaxquant",),  # the package facade (`import jaxquant as jq`): the core's public names
  ("jaxquant.apps",),
)
#: Third-party imports allowed only above the core (optional extras), or inside a function
#: that degrades without them.
APP_ONLY = ("tokenizers", "rich", "matplotlib", "qwix")


def _modules() -> dict[str, Path]:
  out = {}
  for path in ROOT.rglob("*.py"):
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
    out[name] = path
  return out


MODULES = _modules()


def _layer(module: str) -> int:
  for i, layer in enumerate(LAYERS):
    if any(module == m or (m != "jaxquant" and module.startswith(m + ".")) for m in layer):
      return i
  raise AssertionError(f"{module} is in no layer: add it to LAYERS and docs/architecture.md")


def _imports(path: Path):
  """``(imported module, names, top level?)`` for every import in the file."""
  tree = ast.parse(path.read_text())
  top = set(map(id, tree.body))
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      for alias in node.names:
        yield alias.name, [], id(node) in top
    elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
      yield node.module, [a.name for a in node.names], id(node) in top


def _targets(module: str, names: list[str]) -> list[str]:
  """The jaxquant modules an import statement loads (``from jaxquant import io`` -> io)."""
  found = [f"{module}.{n}" for n in names if f"{module}.{n}" in MODULES]
  return found or ([module] if module in MODULES else [])


def _graph() -> dict[str, set[str]]:
  edges: dict[str, set[str]] = {m: set() for m in MODULES}
  for module, path in MODULES.items():
    for imported, names, _ in _imports(path):
      if imported.startswith("jaxquant"):
        edges[module].update(t for t in _targets(imported, names) if t != module)
  return edges


@pytest.mark.parametrize("module", sorted(MODULES))
def test_imports_point_down_the_layers(module):
  own = _layer(module)
  for target in _graph()[module]:
    assert _layer(target) <= own, f"{module} (layer {own}) imports {target} ({_layer(target)})"


def test_no_import_cycles():
  graph, state, stack = _graph(), {}, []

  def visit(m):
    state[m] = "open"
    stack.append(m)
    for t in sorted(graph[m]):
      if state.get(t) == "open":
        raise AssertionError("import cycle: " + " -> ".join(stack[stack.index(t) :] + [t]))
      if t not in state:
        visit(t)
    stack.pop()
    state[m] = "done"

  for m in sorted(graph):
    if m not in state:
      visit(m)


@pytest.mark.parametrize("module", sorted(MODULES))
def test_no_private_names_or_hidden_imports_across_modules(module):
  for imported, names, top in _imports(MODULES[module]):
    if not imported.startswith("jaxquant"):
      continue
    private = [n for n in names if n.startswith("_") and n != "__version__"]
    assert not private, f"{module} imports private {private} from {imported}: make them public"
    assert top, f"{module} imports {imported} inside a function: import it at the top"


@pytest.mark.parametrize("module", sorted(m for m in MODULES if not m.startswith("jaxquant.apps")))
def test_the_core_needs_no_application_dependency_and_names_no_model(module):
  source = MODULES[module].read_text()
  for imported, _, top in _imports(MODULES[module]):
    root = imported.split(".")[0]
    assert root not in APP_ONLY or not top, f"{module} needs {root} at import time"
  for word in ("minilm", "smollm", "decoder_serve", "stdlib_source", "--model minilm"):
    assert word not in source.lower(), f"{module} names {word!r}: that belongs in jaxquant.apps"


def test_every_module_sits_in_a_layer():
  for module in MODULES:
    _layer(module)
