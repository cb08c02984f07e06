"""Runs the ledger records: a :class:`~runlora_nb.train.FineTuner` with a :class:`RunLedger` subscribed, and
resuming a recorded run by its id.

The engine never imports the ledger; these two functions put them together, so every panel, CLI command and
sweep trial that should leave a run record builds its tuner here. Under ``torchrun`` / ``accelerate launch`` only
rank 0 records; the other ranks get a plain tuner (resuming from the same checkpoint).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

from torch import nn

from ..train.checkpoint import load_checkpoint
from ..train.config import FineTuneConfig
from ..train.distributed import env_rank
from ..train.engine import FineTuner
from ..train.state import check_config
from .folders import new_run_dir, run_dir
from .reader import check_not_running, saved_config
from .writer import RunLedger

__all__ = ["recorded_tuner", "resume_tuner"]


def recorded_tuner(
    config: FineTuneConfig,
    callbacks: Sequence[Any] = (),
    model: tuple[nn.Module, Any] | None = None,
) -> FineTuner:
    """A tuner whose run is recorded in a fresh run folder under ``config.runs_dir`` (or the default root).

    The adapter goes to the run folder's ``adapter/`` unless ``config.output_dir`` names another place.

    Example:
        >>> tuner = recorded_tuner(FineTuneConfig(steps=20), [PrintProgress()])
        >>> tuner.run(); tuner.run_dir
    """
    if not env_rank().main:  # under torchrun / accelerate only rank 0 records (one run folder, not N)
        return FineTuner(config, callbacks, model)
    folder = new_run_dir(config.backend, config.runs_dir)
    ledger = RunLedger(folder, config)
    return FineTuner(config, [*callbacks, ledger], model, adapter_dir=folder / "adapter", run_dir=folder)


def resume_tuner(
    run_id: str | os.PathLike,
    callbacks: Sequence[Any] = (),
    runs_dir: str | os.PathLike | None = None,
    *,
    config: FineTuneConfig | None = None,
    model: tuple[nn.Module, Any] | None = None,
) -> FineTuner:
    """A tuner that continues recorded run ``run_id`` from its last checkpoint, writing the same folder.

    Args:
        run_id: a run id under the root, or a run folder.
        callbacks: more listeners.
        runs_dir: the ledger root (default: ``$RUNLORA_NB_RUNS``, else the cache's ``runs/``).
        config: the run's config; default: read strictly from its ``config.json``.
        model: as for :class:`FineTuner`.

    Raises:
        ValueError: no such run, a run still running (one writer per folder), a run without a checkpoint, a
            damaged ``config.json``, or a ``config`` that differs from the checkpoint's.
    """
    folder = run_dir(run_id, runs_dir)
    if not env_rank().main:  # the other ranks read the same checkpoint; rank 0 checks and records
        config = config if config is not None else saved_config(folder)
        return FineTuner(config, callbacks, model, resume_from=load_checkpoint(folder))
    check_not_running(folder)  # before anything is read or written
    config = config if config is not None else saved_config(folder)
    state = load_checkpoint(folder)
    check_config(config, state)  # before on_start rewrites config.json with this config
    ledger = RunLedger(folder, config, resume_step=state.step)
    return FineTuner(config, [*callbacks, ledger], model, resume_from=state, adapter_dir=folder / "adapter",
                     run_dir=folder)  # fmt: skip
