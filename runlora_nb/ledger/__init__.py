"""Ledger layer: every run kept as a folder, read back, compared and swept.

Owns :mod:`.folders` (where runs live), :mod:`.writer` (:class:`RunWriter`, and :class:`RunLedger`, the
engine's callback), :mod:`.reader` (:class:`Run`, :func:`load_run`, :func:`list_runs`), :mod:`.recorded`
(:func:`recorded_tuner`, :func:`resume_tuner`), :mod:`.run_compare`, :mod:`.hf_trainer` (the HF Trainer / TRL
callback), :mod:`.space` (:class:`SearchSpace`) and :mod:`.sweep` (optuna sweeps over the ledger). May import
common, core, planning, nn, integrations, assets, measure and train; never assess, app or widgets.
"""

from .folders import new_run_dir, run_dir, runs_root
from .reader import Run, list_runs, load_run, remove_run
from .recorded import recorded_tuner, resume_tuner
from .run_compare import Comparison, compare
from .space import SearchSpace
from .sweep import leaderboard, run_sweep
from .writer import RunLedger, RunWriter

__all__ = [
    "Comparison",
    "Run",
    "RunLedger",
    "RunWriter",
    "SearchSpace",
    "compare",
    "leaderboard",
    "list_runs",
    "load_run",
    "new_run_dir",
    "recorded_tuner",
    "remove_run",
    "resume_tuner",
    "run_dir",
    "run_sweep",
    "runs_root",
]
