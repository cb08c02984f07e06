"""Tuning layer: the fine-tuning engine and what grows around it (configs, events, runs, sweeps, evaluation, export).

Owns: :mod:`.config` (:class:`FineTuneConfig`), :mod:`.events` (events, callbacks, results) and :mod:`.engine`
(:class:`FineTuner`). May import common, core, planning, nn, integrations, assets and measure; never app or
widgets. The loop emits events and never draws.
"""

from .config import FineTuneConfig, with_backend
from .engine import FineTuner, enable_checkpointing
from .events import (
    Callback,
    EndEvent,
    EvalEvent,
    PrintProgress,
    SampleEvent,
    StartEvent,
    StepEvent,
    TrainResult,
)

__all__ = [
    "Callback",
    "EndEvent",
    "EvalEvent",
    "FineTuneConfig",
    "FineTuner",
    "PrintProgress",
    "SampleEvent",
    "StartEvent",
    "StepEvent",
    "TrainResult",
    "enable_checkpointing",
    "with_backend",
]
