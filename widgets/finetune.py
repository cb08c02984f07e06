"""Fine-tune state: run :class:`runlora_nb.tuning.FineTuner` in a background thread and keep its curves.

:class:`FineTuneController` is a FineTuner callback: it records each run's steps, evaluations, samples and chain
plans, can run the same config again with PEFT for an overlay (sequentially, in the same thread), and stops
within a step. No widget is imported here.
"""

from __future__ import annotations

import statistics
import threading
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import pandas as pd

from runlora_nb.tuning import (
    EndEvent,
    EvalEvent,
    FineTuneConfig,
    FineTuner,
    SampleEvent,
    StartEvent,
    StepEvent,
    with_backend,
)

from .tasks import BackgroundTask, Listeners

__all__ = ["FineTuneController", "FineTuneSettings", "RunTrace"]


@dataclass(frozen=True)
class FineTuneSettings:
    """The panel's own fields (the model and LoRA setting come from the picker).

    Attributes:
        dataset: dataset name or file.
        lr: peak learning rate.
        steps: optimizer steps.
        eval_interval: evaluate every this many steps (0: only at the start and the end).
        compare_peft: after the runlora_nb run, train the same config with PEFT and overlay its curves.
        output_dir: where the trainer saves the adapter at the end (None: a fresh run folder in the cache).
        overrides: other :class:`~runlora_nb.tuning.FineTuneConfig` fields (e.g. ``sample_prompts``).
    """

    dataset: str = "sonnets"
    lr: float = 3e-4
    steps: int = 40
    eval_interval: int = 10
    compare_peft: bool = False
    output_dir: str | None = None
    overrides: tuple[tuple[str, Any], ...] = ()


@dataclass
class RunTrace:
    """What one run (one backend) produced so far.

    Attributes:
        backend: ``"runlora"`` or ``"peft"``.
        config: the run's config.
        start: its start event (parameter counts), once prepared.
        steps: step numbers; ``losses``, ``tokens_per_s`` and ``step_s`` run alongside.
        val_steps: evaluation steps; ``val_losses`` alongside.
        samples: ``{"before": [(prompt, text)], "after": [...]}``.
        plans: the chain plan per module after step 1 (runlora_nb only).
        end: the end event.
        stop_requested_at: the last finished step when Stop was pressed (None: not stopped).
    """

    backend: str
    config: FineTuneConfig
    start: StartEvent | None = None
    steps: list[int] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)
    tokens_per_s: list[float] = field(default_factory=list)
    step_s: list[float] = field(default_factory=list)
    val_steps: list[int] = field(default_factory=list)
    val_losses: list[float] = field(default_factory=list)
    samples: dict[str, list[tuple[str, str]]] = field(default_factory=dict)
    plans: pd.DataFrame | None = None
    end: EndEvent | None = None
    stop_requested_at: int | None = None

    @property
    def step(self) -> int:
        return self.steps[-1] if self.steps else 0

    @property
    def median_step_s(self) -> float:
        """Median seconds per step, leaving out the first (planning, warm-up) when there are others."""
        times = self.step_s[1:] or self.step_s
        return statistics.median(times) if times else float("nan")


class FineTuneController:
    """Start and stop fine-tuning runs; a :class:`~runlora_nb.tuning.FineTuner` callback.

    Args:
        picker: the shared :class:`~runlora_nb.widgets.picker.PickerController` (model and LoRA setting);
            None: ``base_config`` alone.
        base_config: the config to start from when there is no picker (default ``FineTuneConfig()``).
        **settings: :class:`FineTuneSettings` fields.

    Events (``subscribe(fn)``, ``fn(kind, payload)``): ``"run"`` (a new :class:`RunTrace`), ``"start"``,
    ``"step"``, ``"eval"``, ``"sample"``, ``"plans"``, ``"end"`` (the trainer's events), ``"finished"`` (all
    runs done), ``"error"`` (traceback text).
    """

    def __init__(
        self, picker: Any = None, base_config: FineTuneConfig | None = None, **settings: Any
    ) -> None:
        self.picker = picker
        self.base_config = base_config or FineTuneConfig()
        self.settings = FineTuneSettings(**settings)
        self.listeners = Listeners()
        self.task = BackgroundTask("runlora-finetune", on_error=self._failed)
        self.runs: list[RunTrace] = []
        self.trainer: FineTuner | None = None
        self.trainers: list[FineTuner] = []
        self.error: str | None = None
        self._stop = threading.Event()
        self._active = False
        self._lock = threading.Lock()

    def subscribe(self, fn) -> Any:
        return self.listeners.subscribe(fn)

    def set(self, **changes: Any) -> FineTuneSettings:
        """Change settings (checked by building the config).

        Raises:
            ValueError: unknown field or an invalid config.
        """
        new = replace(self.settings, **changes)
        old, self.settings = self.settings, new
        try:
            self.config()
        except Exception:
            self.settings = old
            raise
        return new

    def config(self) -> FineTuneConfig:
        """The runlora_nb run's config: the picker's choice plus this panel's settings."""
        s = self.settings
        fields = {"dataset": s.dataset, "lr": s.lr, "steps": s.steps, "eval_interval": s.eval_interval}
        fields["output_dir"] = s.output_dir
        fields.update(dict(s.overrides))
        if self.picker is not None:
            return self.picker.config(**fields)
        return replace(self.base_config, **fields)

    # ----------------------------------------------------------------------------------------- control
    @property
    def running(self) -> bool:
        """Runs were started and have not all ended (cleared before the ``"finished"`` event)."""
        return self._active

    def start(self) -> threading.Thread:
        """Train in a background thread: the runlora_nb run, then (``compare_peft``) the PEFT run."""
        if self.running:
            raise RuntimeError("fine-tuning is already running; press Stop first")
        self.task.join(5.0)
        configs = self._begin()
        return self.task.start(lambda: self._run_all(configs))

    def run(self) -> list[RunTrace]:
        """Train in the calling thread (scripts and tests); returns the runs."""
        if self.running:
            raise RuntimeError("fine-tuning is already running; press Stop first")
        configs = self._begin()
        try:
            self._run_all(configs)
        except Exception as exc:
            import traceback

            self._failed("".join(traceback.format_exception(type(exc), exc, exc.__traceback__)))
            raise
        return self.runs

    def stop(self) -> None:
        """Stop after the current step (thread-safe); the trainer saves the adapter and ends the run."""
        self._stop.set()
        trainer = self.trainer
        with self._lock:
            if self.runs and self.runs[-1].stop_requested_at is None and self.runs[-1].end is None:
                self.runs[-1].stop_requested_at = self.runs[-1].step
        if trainer is not None:
            trainer.stop()

    def join(self, timeout: float | None = None) -> bool:
        return self.task.join(timeout)

    def _begin(self) -> list[FineTuneConfig]:
        config = self.config()
        configs = [with_backend(config, "runlora")]
        if self.settings.compare_peft:
            peft_dir = f"{config.output_dir}-peft" if config.output_dir else None
            configs.append(replace(with_backend(config, "peft"), output_dir=peft_dir))
        with self._lock:
            self.runs = []
            self.trainers = []
            self.trainer = None
            self.error = None
        self._stop.clear()
        self._active = True
        return configs

    def _run_all(self, configs: list[FineTuneConfig]) -> None:
        from .tasks import quiet_imports

        try:
            quiet_imports()
            for config in configs:
                if self._stop.is_set():
                    break
                trace = RunTrace(config.backend, config)
                trainer = FineTuner(config, [self])
                with self._lock:
                    self.runs.append(trace)
                    self.trainers.append(trainer)
                    self.trainer = trainer
                self.listeners.notify("run", trace)
                trainer.run()
        finally:
            self._active = False
        self.listeners.notify("finished", self.runs)

    def _failed(self, text: str) -> None:
        self.error = text
        self._active = False
        self.listeners.notify("error", text)

    # ----------------------------------------------------------------------------------------- callbacks
    def _trace(self, trainer: FineTuner) -> RunTrace:
        with self._lock:
            for trace, t in zip(self.runs, self.trainers):
                if t is trainer:
                    return trace
        raise RuntimeError("event from a trainer this controller did not start")

    def on_start(self, trainer: FineTuner, event: StartEvent) -> None:
        self._trace(trainer).start = event
        if self._stop.is_set():
            trainer.stop()  # Stop pressed while the model was loading (run() clears the trainer's flag)
        self.listeners.notify("start", event)

    def on_sample(self, trainer: FineTuner, event: SampleEvent) -> None:
        self._trace(trainer).samples.setdefault(event.stage, []).append((event.prompt, event.text))
        self.listeners.notify("sample", event)

    def on_step(self, trainer: FineTuner, event: StepEvent) -> None:
        trace = self._trace(trainer)
        trace.steps.append(event.step)
        trace.losses.append(event.loss)
        trace.tokens_per_s.append(event.tokens_per_s)
        trace.step_s.append(event.step_s)
        if self._stop.is_set():
            trainer.stop()
        if event.step == 1 and trace.backend == "runlora":
            trace.plans = trainer.plans
            self.listeners.notify("plans", trace.plans)
        self.listeners.notify("step", event)

    def on_eval(self, trainer: FineTuner, event: EvalEvent) -> None:
        trace = self._trace(trainer)
        trace.val_steps.append(event.step)
        trace.val_losses.append(event.val_loss)
        self.listeners.notify("eval", event)

    def on_end(self, trainer: FineTuner, event: EndEvent) -> None:
        self._trace(trainer).end = event
        self.listeners.notify("end", event)

    # ----------------------------------------------------------------------------------------- views
    def progress(self) -> dict[str, Any]:
        """``{"done", "total", "eta_s", "tokens_per_s", "backend", "loss"}`` over all planned runs.

        ``eta_s`` is the remaining steps times the current run's median step time (None before the first step,
        0 when nothing runs); ``tokens_per_s`` is the current run's median after its first step.
        """
        with self._lock:
            runs = list(self.runs)
        steps_each = runs[0].config.steps if runs else self.settings.steps
        total = (2 if self.settings.compare_peft else 1) * steps_each
        done = min(sum(r.step for r in runs), total)
        current = runs[-1] if runs else None
        rate = current.median_step_s if current else float("nan")
        if not self.running:
            eta = 0.0
        else:
            eta = None if rate != rate else (total - done) * rate  # NaN before the first step
        tps = (current.tokens_per_s[1:] or current.tokens_per_s) if current else []
        return {
            "done": done,
            "total": total,
            "eta_s": eta,
            "tokens_per_s": statistics.median(tps) if tps else None,
            "backend": current.backend if current else None,
            "loss": current.losses[-1] if current and current.losses else None,
        }

    def save_adapter(self, directory: str | Path) -> Path:
        """Save the runlora_nb run's adapter (PEFT format) to ``directory``.

        Raises:
            RuntimeError: nothing trained yet, or training still running.
        """
        if self.running:
            raise RuntimeError("training is running: press Stop (or wait for the end) before saving")
        for trace, trainer in zip(self.runs, self.trainers):
            if trace.backend == "runlora" and trainer.model is not None:
                return trainer.save_adapter(Path(directory).expanduser())
        raise RuntimeError("no trained runlora_nb model yet: press Start first")

    def losses(self) -> pd.DataFrame:
        """All runs' steps: backend, step, loss, tokens_per_s, step_s."""
        frames = [
            pd.DataFrame(
                {
                    "backend": r.backend,
                    "step": r.steps,
                    "loss": r.losses,
                    "tokens_per_s": r.tokens_per_s,
                    "step_s": r.step_s,
                }
            )
            for r in self.runs
        ]
        return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()

    def wait(self, predicate, timeout: float = 60.0, poll: float = 0.01) -> bool:
        """Poll ``predicate(self)`` until it is true, the runs have ended, or ``timeout`` seconds passed
        (tests and notebooks); returns the predicate's last value."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if predicate(self):
                return True
            if not self.running and not self.task.running:
                break
            time.sleep(poll)
        return bool(predicate(self))
