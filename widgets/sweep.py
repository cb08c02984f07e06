"""SweepController: the state behind the Sweep tab (no widgets): settings, a background sweep, live curves.

Drives :func:`runlora_nb.ledger.sweep.run_sweep` (optuna, SQLite, every trial a ledger run). An engine callback
collects each trial's validation curve as it trains; the leaderboard comes from the study.

Events (``subscribe(fn)``, ``fn(kind, payload)``): ``"start"``, ``"trial"`` (a new :class:`TrialCurve`),
``"eval"`` (the curve that got a point), ``"done"`` (the leaderboard DataFrame), ``"error"`` (traceback text).
"""

from __future__ import annotations

import threading
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import pandas as pd

from runlora_nb.ledger.space import SearchSpace, parse_values
from runlora_nb.ledger.sweep import leaderboard, run_sweep
from runlora_nb.train.events import Callback

from .tasks import BackgroundTask, Listeners

__all__ = ["SweepController", "SweepSettings", "TrialCurve"]


@dataclass(frozen=True)
class SweepSettings:
    """What the Sweep tab searches. ``r``, ``lr``, ``alpha_over_r`` and ``dropout`` are texts as on the CLI:
    ``"8"`` (fixed), ``"4,8,16"`` (choices), ``"1e-4:1e-2:log"`` (a range)."""

    model: str = "tiny-llama"
    dataset: str = "sonnets"
    r: str = "4,8"
    lr: str = "1e-3,3e-3"
    alpha_over_r: str = "2"
    dropout: str = "0.05"
    backend: str = "runlora"
    steps: int = 20
    trials: int = 4
    study: str = "sweep"
    storage: str | None = None
    timeout_s: float | None = None
    pruner: str | None = "median"  # optuna's MedianPruner on each evaluation's val loss; None: no pruning
    batch_size: int = 4
    seq_len: int = 64
    eval_interval: int = 5
    runs_dir: str | None = None
    device: str = "auto"  # "auto": CUDA, then MPS, then the CPU

    def space(self) -> SearchSpace:
        """The :class:`SearchSpace` these texts describe (validated)."""
        return SearchSpace(
            r=parse_values(self.r, int),
            lr=parse_values(self.lr, float),
            alpha_over_r=parse_values(self.alpha_over_r, float),
            dropout=parse_values(self.dropout, float),
            backend=parse_values(self.backend, str),
        )


@dataclass
class TrialCurve:
    """One trial's validation curve, filled while it trains."""

    run_id: str
    label: str
    steps: list[int] = field(default_factory=list)
    val_loss: list[float] = field(default_factory=list)


class _Curves(Callback):
    """Each trial's validation curve (a sweep runs its trials one after another, so the last started is live)."""

    def __init__(self, ctl: SweepController) -> None:
        self.ctl = ctl
        self._current: TrialCurve | None = None

    def on_start(self, event) -> None:
        c = event.config
        run_id = event.run_id or f"trial-{len(self.ctl.curves)}"
        curve = TrialCurve(run_id, f"r={c.r} lr={c.lr:g} α={c.alpha:g}")
        with self.ctl._lock:
            self.ctl.curves[run_id] = curve
        self._current = curve
        self.ctl.listeners.notify("trial", curve)

    def on_eval(self, event) -> None:
        curve = self._current
        if curve is None:
            return
        with self.ctl._lock:
            curve.steps.append(event.step)
            curve.val_loss.append(event.val_loss)
        self.ctl.listeners.notify("eval", curve)


class SweepController:
    """A sweep from the panel: validated settings, a background run with Stop, curves and the leaderboard.

    Args:
        **settings: initial :class:`SweepSettings` fields.
    """

    def __init__(self, **settings: Any) -> None:
        self.settings = SweepSettings(**settings)
        self.settings.space()
        self.listeners = Listeners()
        self.curves: dict[int, TrialCurve] = {}
        self.board: pd.DataFrame | None = None
        self.error: str | None = None
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._active = False
        self.task = BackgroundTask("runlora-sweep", on_error=self._failed)

    def subscribe(self, fn) -> Any:
        return self.listeners.subscribe(fn)

    def set(self, **changes: Any) -> SweepSettings:
        """Change settings (validated: the search space must parse); refused while a sweep runs."""
        if self.running:
            raise RuntimeError("sweep: a sweep is running; Stop it before changing the settings")
        unknown = set(changes) - set(SweepSettings.__dataclass_fields__)
        if unknown:
            raise ValueError(f"sweep: unknown setting {sorted(unknown)[0]!r}")
        new = replace(self.settings, **changes)
        new.space()
        for name in ("steps", "trials", "batch_size", "seq_len"):
            v = getattr(new, name)
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                raise ValueError(f"sweep: {name} must be a positive int, got {v!r}")
        self.settings = new
        return new

    @property
    def running(self) -> bool:
        """A sweep was started and has not ended (cleared before the ``"done"`` / ``"error"`` event, so a view
        drawing on that event already shows it finished)."""
        return self._active

    def start(self) -> threading.Thread:
        """Run (or resume: same study name) the sweep in a background thread."""
        if self.running:
            raise RuntimeError("sweep: already running; Stop it first")
        self.task.join(5.0)
        self._stop.clear()
        self.curves, self.board, self.error = {}, None, None
        self._active = True
        self.listeners.notify("start", self.settings)
        return self.task.start(self._run)

    def run(self) -> pd.DataFrame:
        """Run the sweep in the calling thread; returns the leaderboard."""
        self._stop.clear()
        self.curves, self.board, self.error = {}, None, None
        return self._run()

    def stop(self) -> None:
        """Stop after the running trial's current step (it is queued again for the next Start)."""
        self._stop.set()

    def join(self, timeout: float | None = None) -> bool:
        return self.task.join(timeout) and not self._active

    def _run(self) -> pd.DataFrame:
        try:
            board = self._sweep()
        except BaseException:
            self._active = False
            raise
        self.board = board
        self._active = False
        self.listeners.notify("done", board)
        return board

    def _sweep(self) -> pd.DataFrame:
        s = self.settings
        config = {"batch_size": s.batch_size, "seq_len": s.seq_len, "eval_interval": s.eval_interval,
                  "device": s.device}  # fmt: skip
        if s.runs_dir:
            config["runs_dir"] = s.runs_dir
        board = run_sweep(
            s.model,
            s.dataset,
            s.space(),
            s.steps,
            s.trials,
            s.study,
            s.storage,
            timeout=s.timeout_s,
            pruner=s.pruner,
            stop=self._stop,
            config=config,
            callbacks=[_Curves(self)],
        )
        return board

    def _failed(self, text: str) -> None:
        self.error = text
        self.listeners.notify("error", text)

    def snapshot(self) -> list[TrialCurve]:
        """Copies of the curves so far (safe to draw from another thread)."""
        with self._lock:
            return [
                TrialCurve(c.run_id, c.label, list(c.steps), list(c.val_loss)) for c in self.curves.values()
            ]

    def study(self):
        """The optuna study of the current settings (for optuna's plotly views)."""
        import optuna

        from runlora_nb.ledger.sweep import storage_url

        return optuna.load_study(study_name=self.settings.study, storage=storage_url(self.settings.storage))

    def current_leaderboard(self) -> pd.DataFrame:
        """The study's leaderboard now (also while it runs)."""
        return leaderboard(self.settings.study, self.settings.storage)

    def settings_dict(self) -> dict[str, Any]:
        return asdict(self.settings)
