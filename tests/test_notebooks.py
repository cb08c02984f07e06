"""The notebooks: stored clean (no outputs, a ``parameters`` cell with FAST), and each one executes headless.

Execution follows papermill's convention: a cell ``FAST = True`` is injected right after the cell tagged
``parameters``, and the notebook runs with nbclient in a ``python3`` kernel whose working directory is a temporary
copy of ``notebooks/`` (so whatever a notebook writes lands in a temporary folder, never in the repository). The
kernel inherits this session's environment: ``HF_HUB_OFFLINE=1`` and the session's private ``RUNLORA_NB_CACHE``
(see ``conftest.py``).

A notebook fails on an ``error`` output, on stderr output containing a traceback, on any stderr output of the
first cell that imports runlora_nb (a red block under the first cell a user runs), or when it takes longer than
:data:`NOTEBOOK_TIMEOUT_S`; the message names the cell and shows its source.
"""

from __future__ import annotations

import html
import re
import shutil
import time
from pathlib import Path

import nbformat
import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK_DIR = ROOT / "notebooks"
NOTEBOOKS = sorted(NOTEBOOK_DIR.glob("*.ipynb"))
NOTEBOOK_TIMEOUT_S = 300  # per notebook, in FAST mode (all of them together take well under two minutes here)
KERNEL_START_S = 300  # a first kernel start in a new venv on a loaded machine (nbclient's default is 60 s)
KERNEL = "python3"


def _parameters_index(nb: nbformat.NotebookNode) -> int:
    tagged = [k for k, c in enumerate(nb.cells) if "parameters" in c.get("metadata", {}).get("tags", [])]
    assert len(tagged) == 1, f"expected exactly one cell tagged 'parameters', found {len(tagged)}"
    return tagged[0]


def inject_fast(nb: nbformat.NotebookNode, **values) -> nbformat.NotebookNode:
    """Papermill semantics: a new cell with ``FAST = True`` (and ``values``) right after the parameters cell."""
    lines = [f"{k} = {v!r}" for k, v in {"FAST": True, **values}.items()]
    cell = nbformat.v4.new_code_cell("# injected parameters\n" + "\n".join(lines))
    cell.metadata["tags"] = ["injected-parameters"]
    nb.cells.insert(_parameters_index(nb) + 1, cell)
    return nb


def _problems(nb: nbformat.NotebookNode) -> list[str]:
    """An entry per error output and per stderr stream with a traceback, naming the cell."""
    found = []
    importing = [
        k
        for k, c in enumerate(nb.cells)
        if c.cell_type == "code" and re.search(r"\bimport runlora_nb|\bfrom runlora_nb", c.source)
    ]
    for k, cell in enumerate(nb.cells):
        if cell.cell_type != "code":
            continue
        for out in cell.get("outputs", []):
            if (
                importing
                and k == importing[0]
                and out.get("output_type") == "stream"
                and out.get("name") == "stderr"
            ):
                found.append(
                    f"cell {k} (the first to import runlora_nb) writes to stderr:\n{out.get('text', '')}"
                )
            if out.get("output_type") == "error":
                text = f"{out.get('ename')}: {out.get('evalue')}"
            elif (
                out.get("output_type") == "stream"
                and out.get("name") == "stderr"
                and "Traceback" in out.get("text", "")
            ):
                text = out["text"]
            else:
                continue
            found.append(f"cell {k}:\n--- source ---\n{cell.source}\n--- output ---\n{text}")
    # the panels catch their callbacks' exceptions and show them in an error area (an HTML widget): nbclient
    # stores the widgets' final state in the notebook's metadata, so a swallowed traceback is found there
    state = (
        nb.metadata.get("widgets", {}).get("application/vnd.jupyter.widget-state+json", {}).get("state", {})
    )
    for model_id, widget in state.items():
        value = widget.get("state", {}).get("value")
        if isinstance(value, str) and "Traceback (most recent call last)" in value:
            text = html.unescape(re.sub(r"<[^>]+>", "", value))
            found.append(f"a panel shows an error (widget {model_id}):\n{text[-4000:]}")
    return found


def execute(
    path: Path, workdir: Path, timeout_s: int = NOTEBOOK_TIMEOUT_S
) -> tuple[nbformat.NotebookNode, float]:
    """Run a FAST copy of ``path`` with ``workdir`` as the kernel's working directory; returns (notebook, seconds).

    Errors do not raise here (``allow_errors``): the caller inspects the outputs, so every failure is reported
    with its cell.
    """
    from nbclient import NotebookClient

    nb = inject_fast(nbformat.read(path, as_version=4))
    client = NotebookClient(
        nb,
        timeout=timeout_s,
        kernel_name=KERNEL,
        allow_errors=True,
        record_timing=True,
        startup_timeout=KERNEL_START_S,
        resources={"metadata": {"path": str(workdir)}},
    )
    start = time.perf_counter()
    try:
        client.execute()
    except Exception as exc:  # a kernel that never started, or a cell past its limit: name the slow step
        ran = [k for k, c in enumerate(nb.cells) if c.get("execution_count") is not None]
        step = "kernel start" if not ran else f"cell {ran[-1] + 1} (the one after cell {ran[-1]})"
        pytest.fail(
            f"{path.name}: slow or failed step: {step} after {time.perf_counter() - start:.0f} s "
            f"({type(exc).__name__}: {str(exc)[:2000]})\ncell times so far (s): {cell_seconds(nb)}"
        )
    return nb, time.perf_counter() - start


def cell_seconds(nb: nbformat.NotebookNode) -> dict[int, float]:
    """Cell index → seconds it ran, from nbclient's recorded timing (cells that ran only)."""
    from datetime import datetime

    out = {}
    for k, cell in enumerate(nb.cells):
        timing = cell.get("metadata", {}).get("execution", {})
        t0, t1 = timing.get("iopub.execute_input"), timing.get("shell.execute_reply")
        if t0 and t1:
            parse = lambda t: datetime.fromisoformat(t.replace("Z", "+00:00"))  # noqa: E731
            out[k] = round((parse(t1) - parse(t0)).total_seconds(), 1)
    return out


def _repo_files() -> list[Path]:
    """Files under notebooks/ (editor checkpoints and caches aside): a FAST run must not add any."""
    skip = {".ipynb_checkpoints", "__pycache__"}
    return sorted(p.relative_to(ROOT) for p in NOTEBOOK_DIR.rglob("*") if not skip & set(p.parts))


# ------------------------------------------------------------------------------------------------ stored form


def test_notebooks_exist():
    names = [p.name for p in NOTEBOOKS]
    for expected in (
        "00_dashboard.ipynb",
        "01_lora_internals.ipynb",
        "02_chain_race.ipynb",
        "03_finetune_smollm2.ipynb",
        "04_qlora_on_cpu.ipynb",
        "05_poc_report.ipynb",
        "06_sweep.ipynb",
    ):
        assert expected in names


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_is_stored_clean(path):
    """No outputs, no execution counts, python3 kernel, one ``parameters`` cell defining FAST = False."""
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    assert nb.metadata.get("kernelspec", {}).get("name") == KERNEL
    for k, cell in enumerate(nb.cells):
        if cell.cell_type == "code":
            assert cell.outputs == [], (
                f"{path.name} cell {k} has stored outputs: clear them before committing"
            )
            assert cell.execution_count is None, f"{path.name} cell {k} has an execution count"
    params = nb.cells[_parameters_index(nb)]
    assert params.cell_type == "code"
    assert any(line.split("#")[0].replace(" ", "") == "FAST=False" for line in params.source.splitlines()), (
        f"{path.name}: the parameters cell must set FAST = False (people run the full version; CI injects True)"
    )
    first_code = next(c for c in nb.cells if c.cell_type == "code" and c is not params)
    assert 'os.environ.setdefault("HF_HUB_OFFLINE", "1")' in first_code.source, (
        f"{path.name}: the first cell after the parameters must keep the notebook offline"
    )


# ------------------------------------------------------------------------------------------------ execution


@pytest.mark.notebooks
@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_runs_in_fast_mode(path, tmp_path):
    workdir = tmp_path / "notebooks"
    shutil.copytree(NOTEBOOK_DIR, workdir, ignore=shutil.ignore_patterns(".ipynb_checkpoints"))
    before = _repo_files()
    nb, seconds = execute(workdir / path.name, workdir)
    out = tmp_path / f"executed-{path.name}"
    nbformat.write(nb, out)  # kept in the test's temp folder for inspection
    problems = _problems(nb)
    assert not problems, f"{path.name} failed (executed copy: {out}):\n\n" + "\n\n".join(problems)
    slowest = sorted(cell_seconds(nb).items(), key=lambda kv: -kv[1])[:3]
    assert seconds < NOTEBOOK_TIMEOUT_S, (
        f"{path.name} took {seconds:.0f} s in FAST mode; slowest cells (index, s): {slowest}"
    )
    after = _repo_files()
    assert after == before, f"{path.name} wrote into the repository: {sorted(set(after) - set(before))}"
