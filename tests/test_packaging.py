"""Project layout rules: the core never imports UI packages; Binder and the Makefile agree on torch."""

from __future__ import annotations

import ast
import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

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
        "import sys, runlora_nb, runlora_nb.measure, runlora_nb.train, runlora_nb.ledger, runlora_nb.app.report, runlora_nb.app.cli; "
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


def _lock_tool():
    """scripts/lock_drift.py as a module (the scripts folder is not a package)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("lock_drift", ROOT / "scripts/lock_drift.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_lock_pins_every_declared_dependency_within_its_declared_range():
    from packaging.requirements import Requirement

    tool = _lock_tool()
    pins = tool.locked_pins(ROOT / "requirements-lock.txt")
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    declared = [Requirement(d) for d in project["dependencies"] + project["optional-dependencies"]["dev"]]
    for req in declared:
        name = tool.canonical(req.name)
        if name == "torch":
            assert name not in pins, (
                "torch stays out of the lock: TORCH_SPEC installs the local CPU wheel first"
            )
            continue
        assert name in pins, f"{req.name} is declared in pyproject.toml but not pinned: run `make lock`"
        assert req.specifier.contains(pins[name], prereleases=True), (
            f"the lock pins {req.name}=={pins[name]} outside pyproject's {req}: run `make lock`"
        )
    assert not [n for n in pins if n.startswith(("nvidia-", "triton", "cuda-"))], "CUDA packages in the lock"


def test_make_ci_and_binder_install_from_the_lock():
    make = (ROOT / "Makefile").read_text()
    install = make.split("$(VENV)/.installed:")[1].split("\n\n")[0]
    assert "$(LOCK)" in install.splitlines()[0], "the venv must be rebuilt when the lock changes"
    assert "-r $(LOCK)" in install and "--no-deps -e ." in install
    assert re.search(r"^LOCK := requirements-lock.txt$", make, re.M)
    binder = (ROOT / "binder/requirements.txt").read_text().splitlines()
    assert "-r ../requirements-lock.txt" in binder
    assert "make test" in (ROOT / ".ci/run").read_text()


def test_the_installed_environment_matches_the_lock():
    """In the venv `make install` built, what runs is what the lock says (``make test-latest`` skips this)."""
    if os.environ.get("RUNLORA_NB_LATEST"):
        pytest.skip("make test-latest runs against the newest releases on purpose")
    tool = _lock_tool()
    rows = tool.drift(tool.locked_pins(ROOT / "requirements-lock.txt"), tool.installed_versions())
    assert not rows, f"installed versions differ from requirements-lock.txt (name, locked, here): {rows}"


def test_drift_names_what_differs_and_what_is_missing(tmp_path):
    tool = _lock_tool()
    lock = tmp_path / "lock.txt"
    lock.write_text("Foo_Bar==1.0\n    # via x\nbaz==2.0 ; python_version >= '3'\nqux==3.0\n")
    pins = tool.locked_pins(lock)
    assert pins == {"foo-bar": "1.0", "baz": "2.0", "qux": "3.0"}
    assert tool.drift(pins, {"foo-bar": "1.0", "baz": "2.1"}) == [("baz", "2.0", "2.1"), ("qux", "3.0", "-")]
