"""Project layout rules: the core never imports UI packages; Binder and the Makefile agree on torch."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
UI = ("ipywidgets", "plotly", "anywidget", "IPython")


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def test_core_never_imports_ui_packages_or_the_widgets():
    for path in (ROOT / "runlora_nb").rglob("*.py"):
        bad = {n for n in _imports(path) if n.split(".")[0] in UI or n.startswith("runlora_nb.widgets")}
        assert not bad, f"{path.relative_to(ROOT)} imports {bad}"


def test_importing_the_core_loads_no_ui_package():
    code = (
        "import sys, runlora_nb, runlora_nb.measure, runlora_nb.tuning, runlora_nb.app.report, runlora_nb.app.cli; "
        f"print(sorted(m for m in sys.modules if m.split('.')[0] in {UI!r}))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_torch_pin_is_the_same_everywhere():
    make = re.search(r"^TORCH_SPEC \?= (.+)$", (ROOT / "Makefile").read_text(), re.M).group(1).strip()
    binder = [
        ln for ln in (ROOT / "binder/requirements.txt").read_text().splitlines() if ln.startswith("torch")
    ]
    assert binder == [make] == ["torch==2.13.0"]
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    torch_dep = next(d for d in deps if d.startswith("torch"))
    assert torch_dep.startswith("torch>=")  # a range 2.13.0 satisfies: never pulls another torch build


def test_binder_files_use_real_commands():
    post = (ROOT / "binder/postBuild").read_text()
    for line in post.splitlines():
        if line.startswith("runlora-nb "):
            sub = line.split()[1]
            proc = subprocess.run(
                [sys.executable, "-m", "runlora_nb.app.cli", sub, "--help"], capture_output=True, text=True
            )
            assert proc.returncode == 0, line
    assert (ROOT / "binder/runtime.txt").read_text().startswith("python-3.")


def test_readme_names_the_ci_test_command():
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci/run").read_text()
    assert "make test" in readme and "make test" in ci
