"""Train layer: the fine-tuning engine (:class:`FineTuner`), its config, events, history and resumable state.

Owns :mod:`.config`, :mod:`.events`, :mod:`.history`, :mod:`.state`, :mod:`.checkpoint` (a state as a file),
:mod:`.guards`, :mod:`.metrics`, :mod:`.setup` and :mod:`.engine`. May import common, core, planning, nn,
integrations, assets and measure; never ledger, assess, app or widgets. The loop emits events and never draws
or writes a run record: listeners receive each event alone.
"""

from .checkpoint import load_checkpoint, save_checkpoint
from .config import FineTuneConfig, with_backend
from .engine import DivergedError, FineTuner, enable_checkpointing
from .events import (
    Callback,
    CheckpointEvent,
    EndEvent,
    EvalEvent,
    PlansEvent,
    PrintProgress,
    SampleEvent,
    StartEvent,
    StepEvent,
    WarningEvent,
)
from .history import History
from .state import TrainState

__all__ = [
    "Callback",
    "CheckpointEvent",
    "DivergedError",
    "EndEvent",
    "EvalEvent",
    "FineTuneConfig",
    "FineTuner",
    "History",
    "PlansEvent",
    "PrintProgress",
    "SampleEvent",
    "StartEvent",
    "StepEvent",
    "TrainState",
    "WarningEvent",
    "enable_checkpointing",
    "load_checkpoint",
    "save_checkpoint",
    "with_backend",
]
