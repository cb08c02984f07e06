"""Events a fine-tuning run emits (start, step, eval, sample, end), the callback protocol and the run result.

State and events are separate from outputs: listeners (a printer, a panel, a run ledger, a test) draw or record.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING

import pandas as pd

from .config import FineTuneConfig

if TYPE_CHECKING:
    from .engine import FineTuner

__all__ = [
    "Callback",
    "CheckpointEvent",
    "EndEvent",
    "EvalEvent",
    "PrintProgress",
    "SampleEvent",
    "StartEvent",
    "StepEvent",
    "TrainResult",
]


# ------------------------------------------------------------------------------------------------- events


@dataclass(frozen=True)
class StartEvent:
    """Emitted once the model, data and adapters are ready."""

    config: FineTuneConfig
    trainable_params: int
    total_params: int
    train_rows: int
    val_rows: int


@dataclass(frozen=True)
class StepEvent:
    """Emitted after each optimizer step."""

    step: int
    loss: float
    lr: float
    grad_norm: float
    tokens: int
    tokens_per_s: float
    step_s: float
    elapsed_s: float
    saved_bytes: int | None = None
    peak_mem_bytes: int | None = None


@dataclass(frozen=True)
class EvalEvent:
    """Emitted after each evaluation (step 0 is before any training)."""

    step: int
    val_loss: float
    perplexity: float
    accuracy: float | None = None


@dataclass(frozen=True)
class SampleEvent:
    """A generation from a prompt, ``stage`` "before" or "after" training."""

    stage: str
    prompt: str
    text: str


@dataclass(frozen=True)
class EndEvent:
    """Emitted once at the end, normal or not."""

    step: int
    stopped: bool
    adapter_dir: str | None
    elapsed_s: float
    val_loss: float | None
    error: str | None = None
    diverged: bool = False


@dataclass(frozen=True)
class CheckpointEvent:
    """Emitted between steps when a resumable state is due (every ``checkpoint_every`` steps and at Stop)."""

    step: int


class Callback:
    """Base class: override the events you need. Every method receives the trainer and the event."""

    def on_start(self, trainer: FineTuner, event: StartEvent) -> None: ...

    def on_sample(self, trainer: FineTuner, event: SampleEvent) -> None: ...

    def on_step(self, trainer: FineTuner, event: StepEvent) -> None: ...

    def on_eval(self, trainer: FineTuner, event: EvalEvent) -> None: ...

    def on_checkpoint(self, trainer: FineTuner, event: CheckpointEvent) -> None: ...

    def on_end(self, trainer: FineTuner, event: EndEvent) -> None: ...


class PrintProgress(Callback):
    """Prints one line per ``every`` steps and each evaluation (the headless view)."""

    def __init__(self, every: int = 5) -> None:
        self.every = every

    def on_start(self, trainer, event):
        c = event.config
        print(
            f"fine-tune {c.model} on {c.dataset} with {c.backend}: r={c.r}, {c.steps} steps × "
            f"{c.tokens_per_step} tokens; trainable {event.trainable_params:,d} of {event.total_params:,d}"
        )

    def on_step(self, trainer, event):
        if event.step % self.every == 0 or event.step == trainer.config.steps:
            print(
                f"step {event.step:4d}  loss {event.loss:.4f}  lr {event.lr:.2e}  {event.tokens_per_s:,.0f} tok/s"
            )

    def on_eval(self, trainer, event):
        print(f"eval {event.step:4d}  val_loss {event.val_loss:.4f}  ppl {event.perplexity:.2f}")

    def on_sample(self, trainer, event):
        print(f"[{event.stage}] {event.prompt!r} → {event.text!r}")

    def on_end(self, trainer, event):
        failed = ("diverged: " if event.diverged else "failed: ") + (event.error or "")
        how = failed if event.error else ("stopped" if event.stopped else "done")
        print(f"{how} at step {event.step} in {event.elapsed_s:.1f} s; adapter: {event.adapter_dir}")


@dataclass
class TrainResult:
    """What a run produced (also available live as ``trainer.history``)."""

    config: FineTuneConfig
    steps: list[StepEvent] = field(default_factory=list)
    evals: list[EvalEvent] = field(default_factory=list)
    samples: list[SampleEvent] = field(default_factory=list)
    end: EndEvent | None = None
    warnings: list[str] = field(default_factory=list)

    def losses(self) -> pd.DataFrame:
        """Tidy per-step table: step, loss, lr, tokens_per_s, elapsed_s, backend."""
        df = pd.DataFrame([asdict(s) for s in self.steps])
        df["backend"] = self.config.backend
        return df

    def eval_table(self) -> pd.DataFrame:
        df = pd.DataFrame([asdict(e) for e in self.evals])
        df["backend"] = self.config.backend
        return df

    @property
    def tokens_per_s(self) -> float:
        """Median throughput over the steps after the first (the first includes planning and warm-up)."""
        rates = [s.tokens_per_s for s in self.steps[1:]] or [s.tokens_per_s for s in self.steps]
        return float(pd.Series(rates).median()) if rates else math.nan
