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
from dataclasses import dataclass
from pathlib import Path

import nbformat
import pytest

from runlora_nb.core.chains import valid_pairs
from runlora_nb.measure.layer_race import TWIN_SPREAD_LIMIT

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
STAGES_FILE = ROOT / "artifacts" / "browser_stages.json"
# generous per-step limits: a first JupyterLab start in a new venv on a loaded 2-core machine is slow (CI once
# waited > 90 s for the notebook's first render); each step has its own limit so a failure names the slow step
SERVER_LIMIT_S = 300
STEP_LIMIT_S = 300
NOISE_ATTEMPTS = 3
# the notebook's FAST race: a 256 x 128 -> 256 layer, no dropout: frozen, peft, runlora and every valid pair
RACE_CANDIDATES = 4 + len(list(valid_pairs(0.0)))  # frozen, peft, runlora, twin + pairs


@dataclass
class Lab:
    """A running JupyterLab server: where it is, its token, its notebook folder, its log and its start-up time."""

    base: str
    token: str
    root: Path
    log: Path
    startup_s: float

    def kernels(self) -> list[dict]:
        """The server's kernels (id, name, execution_state) from its REST API; [] when it does not answer."""
        try:
            with urllib.request.urlopen(f"{self.base}/api/kernels?token={self.token}", timeout=5) as r:
                return [
                    {k: kern.get(k) for k in ("id", "name", "execution_state")}
                    for kern in json.loads(r.read())
                ]
        except (OSError, ValueError):
            return []


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
    """A running JupyterLab (a :class:`Lab`); shut down (with its kernels) afterwards."""
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
    started = time.monotonic()
    try:
        deadline = started + SERVER_LIMIT_S
        while True:
            try:
                with urllib.request.urlopen(f"{base}/api/status?token={token}", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(
                    f"slow step 'server': JupyterLab did not answer /api/status within {SERVER_LIMIT_S} s "
                    f"(exit code {proc.poll()}):\n{(tmp_path / 'jupyterlab.log').read_text()[-3000:]}"
                )
            time.sleep(0.25)
        yield Lab(base, token, root, tmp_path / "jupyterlab.log", time.monotonic() - started)
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


class Stages:
    """Times every step of the browser run and fails naming the step that was slow.

    Each :meth:`wait` polls a JS predicate in the page (or a Python callable) until it returns a truthy value,
    within that step's own generous limit, and records how long the step took. On a timeout the failure names the
    step, its limit, the times of the steps before it, the kernel's state from the server's REST API, the page's
    text and the tail of the JupyterLab log, so a slow machine reads differently from a broken page.
    """

    def __init__(self, page, lab: Lab):
        self.page, self.lab = page, lab
        self.times: dict[str, float] = {"server": round(lab.startup_s, 1)}
        self.figures: dict[str, float] = {}  # what the run measured besides time (the noise check's spread)
        self._t = time.monotonic()

    def _fail(self, step: str, limit_s: float, detail: str = "") -> None:
        try:
            body = self.page.evaluate("() => document.body.innerText.slice(-3000)")
        except Exception as exc:  # the page itself may be gone
            body = f"(page text unavailable: {exc})"
        try:  # every panel's status line (what the dashboard says it is doing)
            statuses = self.page.evaluate(
                "() => [...document.querySelectorAll('.runlora-status')].map(e => e.innerText.trim())"
            )
        except Exception:
            statuses = []
        log = self.lab.log.read_text()[-2000:] if self.lab.log.exists() else ""
        pytest.fail(
            f"slow step {step!r}: not done within {limit_s:.0f} s {detail}\n"
            f"steps before it (s): {self.times}\nkernels: {self.lab.kernels()}\npanel status lines: {statuses}\n"
            f"--- page text (end) ---\n{body}\n--- jupyterlab log (end) ---\n{log}"
        )

    def wait(self, step: str, js, arg=None, limit_s: float = STEP_LIMIT_S):
        """Poll ``js`` (a JS function source, or a Python callable) until truthy; returns its value."""
        t0 = time.monotonic()
        while True:
            value = js() if callable(js) else self.page.evaluate(js, arg)
            if value:
                self.times[step] = round(time.monotonic() - t0, 1)
                return value
            if time.monotonic() - t0 > limit_s:
                self._fail(step, limit_s)
            self.page.wait_for_timeout(250)

    def report(self) -> Path:
        """Write the step times to ``artifacts/browser_stages.json`` (the note quotes them); returns the path."""
        STAGES_FILE.parent.mkdir(parents=True, exist_ok=True)
        total = round(sum(self.times.values()), 1)
        STAGES_FILE.write_text(
            json.dumps({"steps_s": self.times, "total_s": total, **self.figures}, indent=1)
        )
        return STAGES_FILE


# number of data points of one trace of one panel's plotly chart, from the rendered SVG
_BAR_POINTS = """([panel, index]) => {
  const plot = document.querySelector(`.${panel} .js-plotly-plot`);
  if (!plot) return 0;
  const traces = plot.querySelectorAll('.barlayer .trace.bars');
  return traces.length > index ? traces[index].querySelectorAll('.point path').length : 0;
}"""
# points of the first line of a panel's second plotly chart (the Fine-tune panel's memory chart)
_SECOND_CHART_POINTS = """(panel) => {
  const plots = document.querySelectorAll(`.${panel} .js-plotly-plot`);
  if (plots.length < 2) return 0;
  const line = plots[1].querySelector('.scatterlayer .trace.scatter .js-line');
  if (!line) return 0;
  return (line.getAttribute('d') || '').split(/[ML]/).filter(s => s.trim()).length;
}"""
# lines with at least two points in one panel's plotly chart (one per sweep trial)
_LINE_COUNT = """(panel) => {
  const plot = document.querySelector(`.${panel} .js-plotly-plot`);
  if (!plot) return 0;
  return [...plot.querySelectorAll('.scatterlayer .trace.scatter .js-line')]
    .filter(l => (l.getAttribute('d') || '').split(/[ML]/).filter(s => s.trim()).length >= 2).length;
}"""
# the notebook toolbar's execution indicator says idle (JupyterLab 4); a Lab without it counts as idle
_TOOLBAR_IDLE = """() => {
  const ind = document.querySelector('.jp-Notebook-ExecutionIndicator');
  return !ind || !ind.hasAttribute('data-status') || ind.getAttribute('data-status') === 'idle';
}"""
# the race panel's inputs read as the noise check needs them: 1024 x 512 -> 512, 15 rounds, the box ticked
_RACE_SETTINGS = """() => {
  const race = document.querySelector('.runlora-race');
  const readout = (label) => [...race.querySelectorAll('.widget-slider')]
    .find(s => s.querySelector('.widget-label')?.innerText.trim() === label)
    ?.querySelector('.widget-readout')?.innerText.trim();
  const box = [...race.querySelectorAll('.widget-checkbox')].find(b => /noise check/.test(b.innerText));
  const got = [readout('N tokens'), readout('i (in)'), readout('o (out)'), readout('rounds'),
               !!box?.querySelector('input')?.checked];
  return JSON.stringify(got) === JSON.stringify(['1024', '512', '512', '30', true]);
}"""
# a race began: the status line no longer shows the previous result
_RACE_STARTED = (
    """() => !/^done/.test(document.querySelector('.runlora-race .runlora-status')?.innerText || 'done')"""
)
# the noise check's result table (shown when the race is done): candidate → median seconds
_NOISE_MEDIANS = """() => {
  const status = document.querySelector('.runlora-race .runlora-status')?.innerText || '';
  if (!/done.*noise check/.test(status)) return null;
  for (const t of document.querySelectorAll('.runlora-race table')) {
    const heads = [...t.querySelectorAll('thead tr:first-child th')].map(h => h.innerText.trim());
    const ci = heads.indexOf('candidate'), mi = heads.indexOf('median_s');
    if (ci < 0 || mi < 0) continue;
    const out = {};
    for (const tr of t.querySelectorAll('tbody tr')) {
      const cells = [...tr.children].map(c => c.innerText.trim());
      out[cells[ci]] = parseFloat(cells[mi]);
    }
    return Object.keys(out).length ? out : null;
  }
  return null;
}"""
# a code cell's prompt shows it queued or run: [*] or [n]
_RAN = "/\\[(\\*|\\d+)\\]/.test(p.innerText)"
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

    lab = jupyterlab
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1500, "height": 1700})
            page.set_default_timeout(60_000)
            stages = Stages(page, lab)
            page.goto(f"{lab.base}/lab/tree/{NOTEBOOK}?reset&token={lab.token}", timeout=STEP_LIMIT_S * 1000)
            stages.wait("lab shell", "() => !!document.querySelector('.jp-Notebook .jp-Cell')")
            # the kernel: started and idle on the server, and the notebook's toolbar shows it idle
            stages.wait(
                "kernel idle",
                lambda: (
                    (kernels := lab.kernels())
                    and all(k["execution_state"] == "idle" for k in kernels)
                    and page.evaluate(_TOOLBAR_IDLE)
                ),
            )
            page.wait_for_timeout(500)

            # Run → Run All Cells; every code cell is queued at once ([*]); a click lost in a busy page is
            # repeated only while nothing was queued, so no cell runs twice
            def run_all() -> None:
                page.locator(".lm-MenuBar-itemLabel", has_text=re.compile(r"^Run$")).click()
                page.locator(".lm-Menu-itemLabel", has_text=re.compile(r"^Run All Cells$")).click()

            run_all()
            queued = f"() => [...document.querySelectorAll('.jp-InputPrompt')].some(p => {_RAN})"
            try:
                stages.wait("cells queued", queued, limit_s=30)
            except pytest.fail.Exception:
                run_all()
                stages.wait("cells queued (second Run All)", queued)

            # the dashboard renders: its four tabs are on the page
            stages.wait("dashboard render", "() => !!document.querySelector('.runlora-picker')")
            page.locator(".lm-TabBar-tab", has_text="Chain race").click()

            # the race (run from the notebook) draws a bar for every candidate, live and at the end
            n_bars = stages.wait(
                "race bars",
                f"(a) => ({_BAR_POINTS})(a) >= {RACE_CANDIDATES} ? ({_BAR_POINTS})(a) : 0",
                ["runlora-race", 0],
            )
            assert n_bars == RACE_CANDIDATES
            saved_bars = page.evaluate(_BAR_POINTS, ["runlora-race", 1])
            assert saved_bars == RACE_CANDIDATES  # saved-activation bars too
            stages.wait(
                "race done",
                "() => /done/.test(document.querySelector('.runlora-race .runlora-status')?.innerText || '')",
            )

            # the fine-tune (started by the notebook) plots loss points while it trains
            page.locator(".lm-TabBar-tab", has_text="Fine-tune").click()
            points = stages.wait(
                "loss points",
                f"(p) => ({_LINE_POINTS})(p) >= 3 ? ({_LINE_POINTS})(p) : 0",
                "runlora-finetune",
            )
            assert points >= 3
            # the memory chart draws the measured saved bytes step by step, and the X-ray (LoRA lab tab) fills
            # from the run's evaluations
            memory_points = stages.wait(
                "memory chart points",
                f"(p) => ({_SECOND_CHART_POINTS})(p) >= 2 ? ({_SECOND_CHART_POINTS})(p) : 0",
                "runlora-finetune",
            )
            assert memory_points >= 2
            page.locator(".lm-TabBar-tab", has_text="LoRA lab").click()
            xray_bars = stages.wait(
                "x-ray bars", f"(a) => ({_BAR_POINTS})(a)", ["runlora-xray", 0], limit_s=120
            )
            assert xray_bars >= 1
            page.locator(".lm-TabBar-tab", has_text="Fine-tune").click()

            # a real click on Stop ends training within two steps
            stop = page.locator(".runlora-finetune button", has_text="Stop")
            assert stop.is_enabled()
            stop.click()
            status = stages.wait(
                "stop",
                "() => { const t = document.querySelector('.runlora-finetune .runlora-status')?.innerText || '';"
                " return /stopped at step/.test(t) ? t : ''; }",
                limit_s=120,
            )
            match = re.search(r"stopped at step (\d+) \(Stop pressed after step (\d+)\)", status)
            assert match, status
            stopped, pressed = int(match[1]), int(match[2])
            assert 0 <= stopped - pressed <= 2, status
            assert stopped < 400  # it did not run to the end
            stages.wait(
                "start enabled",
                "() => { const b = [...document.querySelectorAll('.runlora-finetune button')]"
                ".find(b => b.innerText.includes('Start')); return b && !b.disabled; }",
                limit_s=120,
            )

            # the Runs tab lists the stopped run of the ledger (re-read when the fine-tune ended)
            page.locator(".lm-TabBar-tab", has_text="Runs").click()
            stages.wait(
                "runs tab lists the run",
                "() => [...document.querySelectorAll('.runlora-runs select option')]"
                ".some(o => /stopped/.test(o.innerText))",
                limit_s=60,
            )

            # a 4-trial rank × lr sweep started from the Sweep tab: four validation curves and a leaderboard
            page.locator(".lm-TabBar-tab", has_text="Sweep").click()
            page.locator(".runlora-sweep button", has_text="Start").click()
            stages.wait(
                "sweep done",
                "() => /done/.test(document.querySelector('.runlora-sweep .runlora-status')?.innerText || '')",
            )
            curves = stages.wait(
                "sweep curves", f"(p) => ({_LINE_COUNT})(p) >= 4 ? ({_LINE_COUNT})(p) : 0", "runlora-sweep"
            )
            assert curves == 4
            rows = page.evaluate("() => document.querySelectorAll('.runlora-leaderboard tbody tr').length")
            assert rows == 4

            # an honest race: a noise check (the planner's layer against three copies of itself, on a layer big
            # enough to time, 1024 x 512 -> 512, 30 rounds) gives medians within ±10% of each other
            page.locator(".lm-TabBar-tab", has_text="Chain race").click()
            race = page.locator(".runlora-race")
            race.locator(".widget-checkbox", has_text="noise check").locator("input").check()
            for label, presses in (("N tokens", 2), ("i (in)", 3), ("o (out)", 2), ("rounds", 25)):
                handle = race.locator(".widget-slider", has_text=label).locator(".noUi-handle")
                for _ in range(presses):
                    handle.press("ArrowRight")
            stages.wait("noise check set", _RACE_SETTINGS, limit_s=30)
            # a twin's median can be hit by another process on a shared machine: the race runs up to three
            # times and one of them must meet ±10% (a bias of the race itself would miss it every time)
            spreads = []
            for attempt in range(1, NOISE_ATTEMPTS + 1):
                race.locator("button", has_text="Race").click()
                stages.wait(f"noise check race {attempt} started", _RACE_STARTED, limit_s=60)
                medians = stages.wait(f"noise check race {attempt}", _NOISE_MEDIANS)
                assert len(medians) == 4, medians  # runlora and its three twins
                values = list(medians.values())
                mean = sum(values) / len(values)
                spreads.append(round(max(abs(v / mean - 1) for v in values), 3))
                if spreads[-1] <= 0.10:
                    break
            stages.figures["noise check: largest |median/mean - 1| per attempt"] = spreads
            # on a machine other processes keep busy no race is quiet: then the panel must say so (its twin
            # spread note, the measurements' own warning) rather than present noise as a result
            status = race.locator(".runlora-status").first.inner_text()
            twin_spread = max(medians.values()) / min(medians.values()) - 1
            assert spreads[-1] <= 0.10 or (twin_spread > TWIN_SPREAD_LIMIT and "twin spread" in status), (
                f"noise check: the four copies of one layer missed ±10% of their mean in {NOISE_ATTEMPTS} races "
                f"(largest deviation per race {spreads}; last medians (s) {medians}; load average "
                f"{os.getloadavg()}) and the panel did not report a twin spread above {TWIN_SPREAD_LIMIT:.0%} "
                f"(status: {status!r})"
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
                for k, title in enumerate(("Model", "Chain race", "LoRA lab", "Fine-tune", "Sweep", "Runs")):
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
    assert (
        lab.root / "runs" / "dashboard-fast" / "adapter_config.json"
    ).is_file()  # the stopped run was saved
    # no overall time limit (each step has its own): the step times go to a file the note quotes, and to the log
    print(f"browser test: {json.loads(stages.report().read_text())}")
