"""One history of a run: events in, many readers out (livelossplot's idea).

:class:`History` is a callback: the engine feeds it every event, and so can anything else that produces the
same events (a run read back from the ledger, a Hugging Face Trainer). Tables, the steady-state throughput,
the last validation loss and a checkpoint's copy are all read from it, with the one definition of each metric
in :mod:`runlora_nb.common.metrics`.
"""

from __future__ import annotations

import math
from dataclasses import MISSING, asdict, dataclass, field, fields
from typing import Any

import pandas as pd

from ..common.metrics import steady_tokens_per_s
from .config import FineTuneConfig
from .events import (
    Callback,
    EndEvent,
    EvalEvent,
    PlansEvent,
    SampleEvent,
    StartEvent,
    StepEvent,
    WarningEvent,
)

__all__ = ["History"]


def _known(cls: type, record: dict[str, Any]) -> dict[str, Any]:
    names = {f.name for f in fields(cls)}
    return {k: v for k, v in record.items() if k in names}


def _complete(cls: type, record: dict[str, Any]) -> dict[str, Any]:
    """``record``'s known fields, with NaN or None for the required ones it lacks (a Trainer logs fewer)."""
    out = _known(cls, record)
    for f in fields(cls):
        if f.name not in out and f.default is MISSING:
            out[f.name] = math.nan if f.type in ("float", float) else None
    return out


@dataclass
class History(Callback):
    """What a run did, step by step (also what ``FineTuner.run()`` returns).

    Attributes:
        config: the run's config (None until a start event, for a history built from records).
        steps, evals, samples: the events, in order.
        plans: the chain plan rows of the run's layers (after the first step).
        warnings: messages of the run's warning events.
        end: the end event (None while running).
    """

    config: FineTuneConfig | None = None
    steps: list[StepEvent] = field(default_factory=list)
    evals: list[EvalEvent] = field(default_factory=list)
    samples: list[SampleEvent] = field(default_factory=list)
    plans: list[dict[str, Any]] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    end: EndEvent | None = None

    # ------------------------------------------------------------------------------------------- events in
    def on_start(self, event: StartEvent) -> None:
        self.config = event.config

    def on_step(self, event: StepEvent) -> None:
        self.steps.append(event)

    def on_eval(self, event: EvalEvent) -> None:
        self.evals.append(event)

    def on_sample(self, event: SampleEvent) -> None:
        self.samples.append(event)

    def on_plans(self, event: PlansEvent) -> None:
        self.plans = list(event.plans)

    def on_warning(self, event: WarningEvent) -> None:
        self.warnings.append(event.message)

    def on_end(self, event: EndEvent) -> None:
        self.end = event

    # ------------------------------------------------------------------------------------------- readers
    @property
    def backend(self) -> str | None:
        return self.config.backend if self.config is not None else None

    def losses(self) -> pd.DataFrame:
        """Tidy per-step table: step, loss, lr, grad_norm, tokens, tokens_per_s, step_s, …, backend."""
        df = pd.DataFrame([asdict(s) for s in self.steps], columns=[f.name for f in fields(StepEvent)])
        df["backend"] = self.backend
        return df

    def eval_table(self) -> pd.DataFrame:
        """Tidy per-evaluation table: step, val_loss, perplexity, accuracy, tokens, backend."""
        df = pd.DataFrame([asdict(e) for e in self.evals], columns=[f.name for f in fields(EvalEvent)])
        df["backend"] = self.backend
        return df

    @property
    def tokens_per_s(self) -> float:
        """Steady-state throughput (see :func:`runlora_nb.common.metrics.steady_tokens_per_s`)."""
        return steady_tokens_per_s(s.tokens_per_s for s in self.steps)

    @property
    def val_loss(self) -> float:
        """The last evaluation's token-weighted validation loss (NaN before any)."""
        return self.evals[-1].val_loss if self.evals else math.nan

    # ------------------------------------------------------------------------------------------- copies
    @classmethod
    def from_records(
        cls,
        steps: list[dict[str, Any]],
        evals: list[dict[str, Any]] = (),
        samples: list[dict[str, Any]] = (),
        config: FineTuneConfig | None = None,
    ) -> History:
        """A history from recorded rows (a run folder's metrics, a Trainer's logs).

        Step rows may name the loss ``train_loss`` (the ledger's column) or ``loss``; unknown keys are dropped,
        missing optional fields are None.
        """
        history = cls(config)
        for kind, rows in (("step", steps), ("eval", evals), ("sample", samples)):
            for row in rows:
                history.record(kind, row)
        return history

    def record(self, kind: str, row: dict[str, Any]) -> None:
        """Feed one recorded row as the event it stands for: ``kind`` "step", "eval" or "sample".

        Raises:
            ValueError: another kind.
        """
        if kind == "step":
            row = {("loss" if k == "train_loss" else k): v for k, v in row.items()}
            self.on_step(StepEvent(**_complete(StepEvent, row)))
        elif kind == "eval":
            self.on_eval(EvalEvent(**_complete(EvalEvent, row)))
        elif kind == "sample":
            self.on_sample(SampleEvent(**_complete(SampleEvent, row)))
        else:
            raise ValueError(f"History.record: kind must be 'step', 'eval' or 'sample', got {kind!r}")

    def to_dict(self) -> dict[str, list[dict[str, Any]]]:
        """Steps, evals and samples as lists of plain dicts (what a checkpoint stores)."""
        return {
            "steps": [asdict(s) for s in self.steps],
            "evals": [asdict(e) for e in self.evals],
            "samples": [asdict(s) for s in self.samples],
        }

    def restore(self, data: dict[str, list[dict[str, Any]]]) -> None:
        """Replace steps, evals and samples with those of :meth:`to_dict` (older records' extra keys dropped)."""
        self.steps[:] = [StepEvent(**_known(StepEvent, s)) for s in data.get("steps", [])]
        self.evals[:] = [EvalEvent(**_known(EvalEvent, e)) for e in data.get("evals", [])]
        self.samples[:] = [SampleEvent(**_known(SampleEvent, s)) for s in data.get("samples", [])]
