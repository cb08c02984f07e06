"""Fine-tune state: run :class:`runlora_nb.train.FineTuner` in a background thread and keep its curves.

:class:`FineTuneController` starts each run as a recorded run of the ledger and reads its curves from the
trainer's own :class:`~runlora_nb.train.History`; a small listener per run forwards its events to the panel's
subscribers. It can run the same config again with PEFT for an overlay (sequentially, in the same thread), and
stops within a step. No widget is imported here.
"""

from __future__ import annotations

import gc
import math
import statistics
import threading
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import pandas as pd

from runlora_nb.common.metrics import steady_tokens_per_s
from runlora_nb.common.sysmem import reset_peak_rss
from runlora_nb.ledger.recorded import recorded_tuner
from runlora_nb.train import (
    Callback,
    EndEvent,
    EvalEvent,
    FineTuneConfig,
    FineTuner,
    History,
    PlansEvent,
    SampleEvent,
    StartEvent,
    StepEvent,
    with_backend,
)

from .adapter_xray import XrayHistory
from .memory_watch import MemoryPrediction, predict_memory
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
        predict_memory: before each run, ask the memory ledger what it should take (the memory chart's
            prediction lines; a few tiny probe forwards).
        overrides: other :class:`~runlora_nb.train.FineTuneConfig` fields (e.g. ``sample_prompts``).
    """

    dataset: str = "sonnets"
    lr: float = 3e-4
    steps: int = 40
    eval_interval: int = 10
    compare_peft: bool = False
    output_dir: str | None = None
    overrides: tuple[tuple[str, Any], ...] = ()
    predict_memory: bool = True


@dataclass
class RunTrace:
    """One run (one backend) as the panel reads it: views over the engine's own :class:`History`.

    Attributes:
        backend: ``"runlora"`` or ``"peft"``.
        config: the run's config.
        history: the run's history (the trainer's, filled as events arrive).
        start: its start event (parameter counts), once prepared.
        plans: the chain plan per module after step 1 (runlora_nb only), as a table.
        stop_requested_at: the last finished step when Stop was pressed (None: not stopped).
        memory: the memory ledger's prediction (None: not asked for, or it failed; see ``memory_error``).
        xray: the adapter's X-ray after each evaluation (:class:`~runlora_nb.widgets.adapter_xray.XrayHistory`).
    """

    backend: str
    config: FineTuneConfig
    history: History = field(default_factory=History)
    start: StartEvent | None = None
    plans: pd.DataFrame | None = None
    stop_requested_at: int | None = None
    memory: MemoryPrediction | None = None
    memory_error: str | None = None
    xray: XrayHistory = field(default_factory=XrayHistory)

    @property
    def steps(self) -> list[int]:
        return [s.step for s in self.history.steps]

    @property
    def losses(self) -> list[float]:
        return [s.loss for s in self.history.steps]

    @property
    def tokens_per_s(self) -> list[float]:
        return [s.tokens_per_s for s in self.history.steps]

    @property
    def step_s(self) -> list[float]:
        return [s.step_s for s in self.history.steps]

    @property
    def val_steps(self) -> list[int]:
        return [e.step for e in self.history.evals]

    @property
    def val_losses(self) -> list[float]:
        return [e.val_loss for e in self.history.evals]

    @property
    def samples(self) -> dict[str, list[tuple[str, str]]]:
        """``{"before": [(prompt, text)], "after": [...]}``."""
        out: dict[str, list[tuple[str, str]]] = {}
        for s in list(self.history.samples):
            out.setdefault(s.stage, []).append((s.prompt, s.text))
        return out

    @property
    def end(self) -> EndEvent | None:
        return self.history.end

    @property
    def step(self) -> int:
        steps = self.history.steps
        return steps[-1].step if steps else 0

    @property
    def median_step_s(self) -> float:
        """Median seconds per step, leaving out the first (planning, warm-up) when there are others."""
        times = self.step_s[1:] or self.step_s
        return statistics.median(times) if times else float("nan")


class _RunListener(Callback):
    """One run's events, forwarded to the controller's subscribers (and Stop checked between steps)."""

    def __init__(self, controller: FineTuneController, trace: RunTrace, stop_run) -> None:
        self.controller, self.trace, self.stop_run = controller, trace, stop_run

    def on_start(self, event: StartEvent) -> None:
        self.trace.start = event
        if self.controller._stop.is_set():
            self.stop_run()  # Stop pressed while the model was loading (run() clears the trainer's flag)
        self.controller.listeners.notify("start", event)

    def on_sample(self, event: SampleEvent) -> None:
        self.controller.listeners.notify("sample", event)

    def on_step(self, event: StepEvent) -> None:
        if self.controller._stop.is_set():
            self.stop_run()
        self.controller.listeners.notify("step", event)

    def on_plans(self, event: PlansEvent) -> None:
        if self.trace.backend == "runlora":
            self.trace.plans = pd.DataFrame(list(event.plans))
            self.controller.listeners.notify("plans", self.trace.plans)

    def on_eval(self, event: EvalEvent) -> None:
        self.controller.listeners.notify("eval", event)
        self.controller._xray(self.trace, event.step)

    def on_end(self, event: EndEvent) -> None:
        self.controller.listeners.notify("end", event)


class FineTuneController:
    """Start and stop fine-tuning runs (each a recorded :class:`~runlora_nb.train.FineTuner` run).

    Args:
        picker: the shared :class:`~runlora_nb.widgets.picker.PickerController` (model and LoRA setting);
            None: ``base_config`` alone.
        base_config: the config to start from when there is no picker (default ``FineTuneConfig()``).
        **settings: :class:`FineTuneSettings` fields.

    Events (``subscribe(fn)``, ``fn(kind, payload)``): ``"run"`` (a new :class:`RunTrace`), ``"start"``,
    ``"step"``, ``"eval"``, ``"sample"``, ``"plans"``, ``"end"`` (the trainer's events), ``"xray"`` ((trace,
    :class:`~runlora_nb.widgets.adapter_xray.XraySnapshot`) after each evaluation), ``"finished"`` (all runs
    done), ``"error"`` (traceback text).
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
                trainer = recorded_tuner(config)
                trace = RunTrace(config.backend, config, trainer.history)
                trainer.add_callback(_RunListener(self, trace, trainer.stop))
                with self._lock:
                    self.runs.append(trace)
                    self.trainers.append(trainer)
                    self.trainer = trainer
                self.listeners.notify("run", trace)
                if self.settings.predict_memory:
                    self._predict(trace)
                trainer.run()
        finally:
            self._active = False
        self.listeners.notify("finished", self.runs)

    def _predict(self, trace: RunTrace) -> None:
        """The memory ledger's prediction for the run, from the Model panel's loaded base when it matches."""
        loaded = getattr(self.picker, "loaded", None) if self.picker is not None else None
        c = trace.config
        base = (
            loaded.model if loaded is not None and loaded.key == (c.model, c.dtype, c.quantization) else None
        )
        try:
            trace.memory = predict_memory(c, base)
        except Exception as err:  # a prediction that fails must not stop the run it describes
            trace.memory_error = f"{type(err).__name__}: {err}"
        gc.collect()
        reset_peak_rss()  # the run's measured peak starts here, not at the probes' copies of the model
        self.listeners.notify("memory", trace)

    def _xray(self, trace: RunTrace, step: int) -> None:
        """X-ray the model of the trainer this controller created for ``trace`` (the listener only says when)."""
        with self._lock:
            trainer = next((t for r, t in zip(self.runs, self.trainers) if r is trace), None)
        snap = (
            trace.xray.record(step, trainer.model)
            if trainer is not None and trainer.model is not None
            else None
        )
        if snap is not None:
            self.listeners.notify("xray", (trace, snap))

    def _failed(self, text: str) -> None:
        self.error = text
        self._active = False
        self.listeners.notify("error", text)

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
        tps = steady_tokens_per_s(current.tokens_per_s) if current else math.nan
        return {
            "done": done,
            "total": total,
            "eta_s": eta,
            "tokens_per_s": tps if math.isfinite(tps) else None,
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
