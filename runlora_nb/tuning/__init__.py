"""Tuning layer: the fine-tuning engine and what grows around it (configs, events, runs, sweeps).

Owns: :mod:`.config` (:class:`FineTuneConfig`), :mod:`.events` (events, callbacks, results), :mod:`.engine`
(:class:`FineTuner`), :mod:`.runs` (the run ledger), :mod:`.checkpoint` (resumable state), :mod:`.guards`, :mod:`.space`
(:class:`SearchSpace`) and :mod:`.sweep` (optuna sweeps over the ledger). May import common, core, planning, nn, integrations, assets and measure; never app or
widgets. The loop emits events and never draws.
"""

from .config import FineTuneConfig, with_backend
from .engine import DivergedError, FineTuner, enable_checkpointing
from .events import (
    Callback,
    CheckpointEvent,
    EndEvent,
    EvalEvent,
    PrintProgress,
    SampleEvent,
    StartEvent,
    StepEvent,
    TrainResult,
)
from .run_compare import Comparison, compare
from .runs import Run, RunLedger, list_runs, load_run, remove_run
from .space import SearchSpace
from .sweep import leaderboard, run_sweep

__all__ = [
    "Callback",
    "CheckpointEvent",
    "Comparison",
    "DivergedError",
    "EndEvent",
    "EvalEvent",
    "FineTuneConfig",
    "FineTuner",
    "PrintProgress",
    "Run",
    "RunLedger",
    "SampleEvent",
    "SearchSpace",
    "StartEvent",
    "StepEvent",
    "TrainResult",
    "compare",
    "enable_checkpointing",
    "leaderboard",
    "list_runs",
    "load_run",
    "remove_run",
    "run_sweep",
    "with_backend",
]
