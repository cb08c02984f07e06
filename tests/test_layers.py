"""The package's layers: imports only point down, no module imports itself in a circle, no module is huge.

Every import counts: at module level, inside a function (a lazy import that points up is still a circle) and
under ``if TYPE_CHECKING:`` (an annotation that names a module above, or one that imports back, ties the two
modules together for a reader and a type checker even though the import never runs).
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "runlora_nb"
# bottom → top; a module may import its own layer and any layer to its left
LAYERS = (
    "common",
    "core",
    "planning",
    "nn",
    "integrations",
    "assets",
    "measure",
    "train",
    "ledger",
    "assess",
    "app",
    "widgets",
)
WIDGETS = ROOT / "widgets"  # installed as runlora_nb.widgets
TOP = {"runlora_nb"}  # the package facade sits above every layer
MAX_LINES = 500  # past this a module holds more than one idea: split it along them
# Modules over the limit whose split is under way in their own layer's change. An entry must go once its
# module is split: the test fails when an exempt module is back under the limit, so none outlives its reason.


def _module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[0] == "widgets":
        parts.insert(0, "runlora_nb")
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _source_of(module: str) -> Path:
    """The folder-or-file stem of a runlora_nb module (``runlora_nb.widgets.x`` lives in ``widgets/x``)."""
    parts = module.split(".")
    if parts[:2] == ["runlora_nb", "widgets"]:
        return WIDGETS.joinpath(*parts[2:])
    return ROOT.joinpath(*parts)


def _sources() -> list[Path]:
    return [*PKG.rglob("*.py"), *WIDGETS.rglob("*.py")]


def _resolve(module: str, node: ast.ImportFrom, is_pkg: bool) -> list[str]:
    """Absolute runlora_nb modules an ImportFrom names (``from . import x`` names the submodule x)."""
    if node.level:
        base = module.split(".") if is_pkg else module.split(".")[:-1]
        base = base[: len(base) - node.level + 1]
        target = ".".join(base + ([node.module] if node.module else []))
    else:
        target = node.module or ""
    if not target.startswith("runlora_nb"):
        return []
    out = [target]
    for alias in node.names:
        candidate = f"{target}.{alias.name}"
        stem = _source_of(candidate)
        if stem.with_suffix(".py").exists() or (stem / "__init__.py").exists():
            out.append(candidate)
    return out


def import_graph() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {}
    for path in _sources():
        name = _module_name(path)
        deps: set[str] = set()
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                deps.update(_resolve(name, node, path.name == "__init__.py"))
            elif isinstance(node, ast.Import):
                deps.update(a.name for a in node.names if a.name.startswith("runlora_nb"))
        deps.discard(name)
        graph[name] = deps
    return graph


def layer_of(module: str) -> int | None:
    parts = module.split(".")
    if module in TOP or len(parts) < 2:
        return None
    return LAYERS.index(parts[1]) if parts[1] in LAYERS else None


def test_every_module_lives_in_a_known_layer():
    strays = [m for m in import_graph() if m not in TOP and layer_of(m) is None]
    assert not strays, f"modules outside the layers {LAYERS}: {strays} (move them into a layer package)"


def test_imports_only_point_down():
    upward = []
    for module, deps in import_graph().items():
        mine = layer_of(module)
        if mine is None:
            continue
        for dep in deps:
            theirs = layer_of(dep)
            if dep in TOP or (theirs is not None and theirs > mine):
                upward.append(f"{module} → {dep}")
    assert not upward, "imports that point up a layer:\n" + "\n".join(sorted(upward))


def test_no_import_circles():
    graph = {m: {d for d in deps if d in import_graph_cache()} for m, deps in import_graph_cache().items()}
    # a package's __init__ re-exporting its own modules is not a circle: drop edges from a module to its parents
    for m, deps in graph.items():
        graph[m] = {d for d in deps if not m.startswith(d + ".")}
    state: dict[str, int] = {}
    cycles: list[list[str]] = []

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        stack.append(node)
        for dep in sorted(graph.get(node, ())):
            if state.get(dep) == 1:
                cycles.append([*stack[stack.index(dep) :], dep])
            elif dep not in state:
                visit(dep, stack)
        stack.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [])
    assert not cycles, "import circles:\n" + "\n".join(" → ".join(c) for c in cycles)


_GRAPH: dict[str, set[str]] | None = None


def import_graph_cache() -> dict[str, set[str]]:
    global _GRAPH
    if _GRAPH is None:
        _GRAPH = import_graph()
    return _GRAPH


def test_no_module_is_huge():
    lines = {str(p.relative_to(ROOT)): len(p.read_text().splitlines()) for p in _sources()}
    big = {m: n for m, n in lines.items() if n > MAX_LINES}
    assert not big, f"modules over {MAX_LINES} lines (split them along their ideas): {big}"


def test_every_layer_package_says_what_it_owns():
    for layer in LAYERS:
        init = _source_of(f"runlora_nb.{layer}") / "__init__.py"
        doc = ast.get_docstring(ast.parse(init.read_text()))
        assert doc and "may import" in doc.lower(), (
            f"{init.relative_to(ROOT)} must say what it owns and may import"
        )


# the panels' state and jobs: scripts and tests drive them without a notebook, so they import no widget library
CONTROLLERS = ("picker", "race", "lab", "finetune", "runs", "sweep", "tasks", "formatting")


def test_the_controllers_import_without_ipywidgets_or_plotly():
    blocker = (
        "import sys, importlib.abc\n"
        "class Block(importlib.abc.MetaPathFinder):\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in ('ipywidgets', 'plotly', 'anywidget', 'traitlets'):\n"
        "            raise ImportError(f'{name} is blocked: a controller must not need it')\n"
        "sys.meta_path.insert(0, Block())\n"
    )
    code = blocker + "".join(f"import runlora_nb.widgets.{m}\n" for m in CONTROLLERS)
    code += "import runlora_nb.widgets as w\nw.PickerController, w.RaceController, w.SweepController\n"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]


def test_importing_the_widgets_package_loads_no_view_until_one_is_used():
    code = (
        "import sys, runlora_nb.widgets as w\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('ipywidgets', 'plotly')))\n"
        "w.ChainRace\n"
        "print('ipywidgets' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.split("\n")[:2] == ["[]", "True"]
