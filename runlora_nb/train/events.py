"""Events a fine-tuning run emits, and the callback protocol.

Each event carries everything a listener needs to know about what happened: a listener (a printer, a panel,
the run ledger, a test) receives the event alone and never the trainer, so it cannot reach back into the loop.
What the run keeps over time lives in :class:`~runlora_nb.train.history.History`, itself fed by these events.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .config import FineTuneConfig
from .state import TrainState

__all__ = [
    "Callback",
    "CheckpointEvent",
    "EndEvent",
    "EvalEvent",
    "PlansEvent",
    "PrintProgress",
    "SampleEvent",
    "StartEvent",
    "StepEvent",
    "WarningEvent",
]


@dataclass(frozen=True)
class StartEvent:
    """Emitted once the model, data and adapters are ready (``run_id``: the ledger's id, when recorded;
    ``device``: where the run trains)."""

    config: FineTuneConfig
    trainable_params: int
    total_params: int
    train_rows: int
    val_rows: int
    run_id: str | None = None
    device: str | None = None


@dataclass(frozen=True)
class StepEvent:
    """Emitted after each optimizer step (``tokens`` are the non-padding tokens of the step)."""

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
    """Emitted after each evaluation (step 0 is before any training).

    ``val_loss`` is the mean over every target token of the validation batches (token-weighted, as
    :func:`runlora_nb.assess.evaluate.dataset_loss` computes it); ``tokens`` is how many there were.
    """

    step: int
    val_loss: float
    perplexity: float
    accuracy: float | None = None
    tokens: int | None = None


@dataclass(frozen=True)
class SampleEvent:
    """A generation from a prompt, ``stage`` "before" or "after" training, at optimizer step ``step``."""

    stage: str
    prompt: str
    text: str
    step: int = 0


@dataclass(frozen=True)
class PlansEvent:
    """Emitted once, after the first step ran every layer: the chain pair each RunLoRA layer uses.

    ``plans`` are JSON-ready rows (module, shapes, forward and backward chain, …); empty for PEFT.
    """

    step: int
    plans: tuple[dict[str, Any], ...]


@dataclass(frozen=True)
class WarningEvent:
    """Something about the run the user should know (also a ``RuntimeWarning`` and in ``History.warnings``)."""

    step: int
    message: str


@dataclass(frozen=True)
class CheckpointEvent:
    """Emitted between steps when a resumable state is due (every ``checkpoint_every`` steps and at Stop).

    ``state`` is the snapshot itself: a listener writes it (see :func:`runlora_nb.train.checkpoint.save_checkpoint`)
    without calling back into the trainer.
    """

    step: int
    state: TrainState = field(repr=False)


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
    warnings: tuple[str, ...] = ()


class Callback:
    """Base class: override the events you need. Every method receives the event only."""

    def on_start(self, event: StartEvent) -> None: ...

    def on_sample(self, event: SampleEvent) -> None: ...

    def on_step(self, event: StepEvent) -> None: ...

    def on_plans(self, event: PlansEvent) -> None: ...

    def on_eval(self, event: EvalEvent) -> None: ...

    def on_warning(self, event: WarningEvent) -> None: ...

    def on_checkpoint(self, event: CheckpointEvent) -> None: ...

    def on_end(self, event: EndEvent) -> None: ...


class PrintProgress(Callback):
    """Prints one line per ``every`` steps and each evaluation (the headless view)."""

    def __init__(self, every: int = 5) -> None:
        self.every = every
        self._steps = 0

    def on_start(self, event):
        c = event.config
        self._steps = c.steps
        print(
            f"fine-tune {c.model} on {c.dataset} with {c.backend}: r={c.r}, {c.steps} steps × "
            f"{c.tokens_per_step} tokens on {event.device or 'cpu'}; trainable {event.trainable_params:,d} of "
            f"{event.total_params:,d}"
        )

    def on_step(self, event):
        if event.step % self.every == 0 or event.step == self._steps:
            print(
                f"step {event.step:4d}  loss {event.loss:.4f}  lr {event.lr:.2e}  {event.tokens_per_s:,.0f} tok/s"
            )

    def on_eval(self, event):
        print(f"eval {event.step:4d}  val_loss {event.val_loss:.4f}  ppl {event.perplexity:.2f}")

    def on_sample(self, event):
        print(f"[{event.stage}] {event.prompt!r} → {event.text!r}")

    def on_warning(self, event):
        print(f"warning at step {event.step}: {event.message}")

    def on_end(self, event):
        failed = ("diverged: " if event.diverged else "failed: ") + (event.error or "")
        how = failed if event.error else ("stopped" if event.stopped else "done")
        print(f"{how} at step {event.step} in {event.elapsed_s:.1f} s; adapter: {event.adapter_dir}")
