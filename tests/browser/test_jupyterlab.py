"""The dashboard in a real JupyterLab, driven by headless Debian chromium through Python Playwright.

Starts JupyterLab on 127.0.0.1 (random free port, a token, a private config/settings/runtime folder) over a temp
copy of ``notebooks/`` whose ``parameters`` cell is overridden with ``FAST = True`` (papermill style), opens
``00_dashboard.ipynb``, runs all cells from the Run menu, and checks what is rendered on the page: every widget
rendered (no "Loading widget"), no error output, a race bar for every candidate, loss points in the fine-tune
chart, and that the Stop button (a real click) ends training within two steps. Saves a screenshot to
``artifacts/dashboard.png`` (``RUNLORA_NB_SCREENSHOT=docs/dashboard.png`` refreshes the README's).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path

import nbformat
import pytest

from runlora_nb.core.chains import valid_pairs

pytestmark = [pytest.mark.browser, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]
NOTEBOOK = "00_dashboard.ipynb"
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--disable-quic",
]
SCREENSHOT = ROOT / os.environ.get("RUNLORA_NB_SCREENSHOT", "artifacts/dashboard.png")
# the notebook's FAST race: a 256 x 128 -> 256 layer, no dropout: frozen, peft, runlora and every valid pair
RACE_CANDIDATES = 4 + len(list(valid_pairs(0.0)))  # frozen, peft, runlora, twin + pairs


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _fast_copy(dest: Path) -> Path:
    """Copy notebooks/ to ``dest`` and inject ``FAST = True`` after the ``parameters`` cell."""
    shutil.copytree(ROOT / "notebooks", dest)
    path = dest / NOTEBOOK
    nb = nbformat.read(path, as_version=4)
    index = next(k for k, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", []))
    injected = nbformat.v4.new_code_cell("# Parameters\nFAST = True")
    injected.metadata["tags"] = ["injected-parameters"]
    nb.cells.insert(index + 1, injected)
    nbformat.write(nb, path)
    return path


def _lab_settings(settings_dir: Path) -> None:
    """No news or update toasts; render every cell (no windowing), so the whole dashboard is in the DOM."""
    files = {
        "@jupyterlab/apputils-extension/notification.jupyterlab-settings": {
            "fetchNews": "false",
            "checkForUpdates": False,
        },
        "@jupyterlab/notebook-extension/tracker.jupyterlab-settings": {"windowingMode": "none"},
    }
    for name, content in files.items():
        path = settings_dir / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(content))


@pytest.fixture
def jupyterlab(tmp_path):
    """A running JupyterLab: yields (base url, token); shut down (with its kernels) afterwards."""
    root = tmp_path / "notebooks"
    _fast_copy(root)
    for name in ("config", "data", "runtime", "settings", "workspaces"):
        (tmp_path / name).mkdir()
    _lab_settings(tmp_path / "settings")
    port, token = _free_port(), uuid.uuid4().hex
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "JUPYTER_CONFIG_DIR": str(tmp_path / "config"),
        "JUPYTER_RUNTIME_DIR": str(tmp_path / "runtime"),
        "JUPYTERLAB_SETTINGS_DIR": str(tmp_path / "settings"),
        "JUPYTERLAB_WORKSPACES_DIR": str(tmp_path / "workspaces"),
        "JUPYTER_PLATFORM_DIRS": "1",
        "PYTHONUNBUFFERED": "1",
    }
    cmd = [
        sys.executable,
        "-m",
        "jupyterlab",
        "--no-browser",
        "--ip=127.0.0.1",
        f"--port={port}",
        f"--IdentityProvider.token={token}",
        f"--ServerApp.root_dir={root}",
        "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate",
    ]
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        cmd.append("--allow-root")
    log = (tmp_path / "jupyterlab.log").open("w")
    proc = subprocess.Popen(cmd, cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(f"{base}/api/status?token={token}", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"JupyterLab did not start:\n{(tmp_path / 'jupyterlab.log').read_text()[-3000:]}")
            time.sleep(0.25)
        yield base, token, root
    finally:
        try:  # shut down the server and its kernels cleanly, then make sure the process is gone
            req = urllib.request.Request(
                f"{base}/api/shutdown", method="POST", headers={"Authorization": f"token {token}"}
            )
            urllib.request.urlopen(req, timeout=10).close()
        except OSError:
            pass
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)
        log.close()


def _wait(page, js: str, arg=None, timeout_s: float = 60.0, what: str = ""):
    """Poll a JS predicate in the page until it returns a truthy value (returned)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = page.evaluate(js, arg)
        if value:
            return value
        page.wait_for_timeout(200)
    body = page.evaluate("() => document.body.innerText.slice(0, 4000)")
    pytest.fail(f"timed out after {timeout_s:.0f} s waiting for {what or js}\npage text:\n{body}")


# number of data points of one trace of one panel's plotly chart, from the rendered SVG
_BAR_POINTS = """([panel, index]) => {
  const plot = document.querySelector(`.${panel} .js-plotly-plot`);
  if (!plot) return 0;
  const traces = plot.querySelectorAll('.barlayer .trace.bars');
  return traces.length > index ? traces[index].querySelectorAll('.point path').length : 0;
}"""
_LINE_POINTS = """(panel) => {
  const plot = document.querySelector(`.${panel} .js-plotly-plot`);
  if (!plot) return 0;
  const line = plot.querySelector('.scatterlayer .trace.scatter .js-line');
  if (!line) return 0;
  return (line.getAttribute('d') || '').split(/[ML]/).filter(s => s.trim()).length;
}"""


def test_dashboard_in_jupyterlab(jupyterlab):
    if not CHROMIUM.exists():
        pytest.fail(
            f"{CHROMIUM} is missing: run `make browser-deps` (apt-get install chromium) for the browser test"
        )
    from playwright.sync_api import sync_playwright

    base, token, root = jupyterlab
    t0 = time.monotonic()
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1500, "height": 1700})
            page.set_default_timeout(60_000)
            page.goto(f"{base}/lab/tree/{NOTEBOOK}?reset&token={token}")
            page.wait_for_selector(".jp-Notebook .jp-Cell", timeout=90_000)
            # the kernel is up when the toolbar's status says idle
            _wait(page, "() => !!document.querySelector('.jp-Notebook')", what="the notebook")
            page.wait_for_timeout(500)

            # Run → Run All Cells
            page.locator(".lm-MenuBar-itemLabel", has_text=re.compile(r"^Run$")).click()
            page.locator(".lm-Menu-itemLabel", has_text=re.compile(r"^Run All Cells$")).click()

            # the dashboard renders: its four tabs are on the page
            page.wait_for_selector(".runlora-picker", timeout=90_000)
            page.locator(".lm-TabBar-tab", has_text="Chain race").click()

            # the race (run from the notebook) draws a bar for every candidate, live and at the end
            n_bars = _wait(
                page,
                f"(a) => ({_BAR_POINTS})(a) >= {RACE_CANDIDATES} ? ({_BAR_POINTS})(a) : 0",
                ["runlora-race", 0],
                what=f"{RACE_CANDIDATES} race bars",
            )
            assert n_bars == RACE_CANDIDATES
            saved_bars = page.evaluate(_BAR_POINTS, ["runlora-race", 1])
            assert saved_bars == RACE_CANDIDATES  # saved-activation bars too
            _wait(
                page,
                "() => /done/.test(document.querySelector('.runlora-race .runlora-status')?.innerText || '')",
                what="the race status 'done'",
            )

            # the fine-tune (started by the notebook) plots loss points while it trains
            page.locator(".lm-TabBar-tab", has_text="Fine-tune").click()
            points = _wait(
                page,
                f"(p) => ({_LINE_POINTS})(p) >= 3 ? ({_LINE_POINTS})(p) : 0",
                "runlora-finetune",
                what="loss points in the fine-tune chart",
            )
            assert points >= 3

            # a real click on Stop ends training within two steps
            stop = page.locator(".runlora-finetune button", has_text="Stop")
            assert stop.is_enabled()
            stop.click()
            status = _wait(
                page,
                "() => { const t = document.querySelector('.runlora-finetune .runlora-status')?.innerText || '';"
                " return /stopped at step/.test(t) ? t : ''; }",
                what="the fine-tune status 'stopped at step'",
                timeout_s=60,
            )
            match = re.search(r"stopped at step (\d+) \(Stop pressed after step (\d+)\)", status)
            assert match, status
            stopped, pressed = int(match[1]), int(match[2])
            assert 0 <= stopped - pressed <= 2, status
            assert stopped < 400  # it did not run to the end
            _wait(
                page,
                "() => { const b = [...document.querySelectorAll('.runlora-finetune button')]"
                ".find(b => b.innerText.includes('Start')); return b && !b.disabled; }",
                what="Start enabled again",
            )

            # nothing failed: no widget left loading, no error or stderr output, no panel error shown
            text = page.evaluate("() => document.body.innerText")
            assert "Loading widget" not in text
            assert "Error displaying widget" not in text
            errors = page.evaluate(
                "() => [...document.querySelectorAll('.jp-OutputArea-output')]"
                ".filter(e => /error|stderr/.test(e.getAttribute('data-mime-type') || '')).map(e => e.innerText)"
            )
            assert errors == []
            shown = page.evaluate(
                "() => [...document.querySelectorAll('.runlora-errors')].filter(e => e.offsetParent !== null)"
                ".map(e => e.innerText)"
            )
            assert shown == []
            assert "Traceback" not in text

            # RUNLORA_NB_SCREENSHOTS=<folder>: a picture of every tab, for a person to look at
            shots = os.environ.get("RUNLORA_NB_SCREENSHOTS")
            if shots:
                Path(shots).mkdir(parents=True, exist_ok=True)
                for k, title in enumerate(("Model", "Chain race", "LoRA lab", "Fine-tune")):
                    page.locator(".lm-TabBar-tab", has_text=title).click()
                    page.wait_for_timeout(700)
                    page.locator(".jp-OutputArea-output", has=page.locator(".runlora-race")).screenshot(
                        path=str(Path(shots) / f"tab{k}.png")
                    )

            # the picture for the README: the race tab
            page.locator(".lm-TabBar-tab", has_text="Chain race").click()
            page.wait_for_timeout(500)
            SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
            page.locator(".jp-OutputArea-output", has=page.locator(".runlora-race")).screenshot(
                path=str(SCREENSHOT)
            )
        finally:
            browser.close()
    assert SCREENSHOT.stat().st_size > 10_000
    assert (root / "runs" / "dashboard-fast" / "adapter_config.json").is_file()  # the stopped run was saved
    assert time.monotonic() - t0 < 240
