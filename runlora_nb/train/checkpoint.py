"""A :class:`~runlora_nb.train.state.TrainState` as one file, and back.

:func:`save_checkpoint` writes ``<folder>/checkpoint/state.pt`` atomically (a temporary file and
``os.replace``: a kill leaves the previous checkpoint, never half a file). A resumed run takes the next step
the interrupted run would have taken: at dropout 0 in fp32 its adapter equals an uninterrupted run's bit for
bit (the dropout masks' seeds come from torch's generator, restored too). This module never imports the engine.
"""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Any

import torch

from ..common.paths import atomic_write_bytes
from .state import TrainState

__all__ = ["CHECKPOINT_NAME", "load_checkpoint", "save_checkpoint", "state_from_dict", "state_to_dict"]

CHECKPOINT_NAME = "checkpoint/state.pt"
_FORMAT = 1


def state_to_dict(state: TrainState) -> dict[str, Any]:
    """The file's layout: plain containers only, so that ``torch.load(weights_only=True)`` reads it."""
    return {
        "format": _FORMAT,
        "step": state.step,
        "config": dict(state.config),
        "adapter": dict(state.adapter),
        "optimizer": state.optimizer,
        "scheduler": state.scheduler,
        "rng": state.rng,
        "data": list(state.data_pos),
        "elapsed_s": float(state.elapsed_s),
        "history": state.history,
    }


def state_from_dict(data: dict[str, Any]) -> TrainState:
    """The inverse of :func:`state_to_dict` (older files without ``elapsed_s`` use the last step's)."""
    history = data.get("history", {})
    if isinstance(data.get("elapsed_s"), int | float):
        elapsed = float(data["elapsed_s"])
    else:
        steps = history.get("steps") or []
        elapsed = float(steps[-1].get("elapsed_s", 0.0)) if steps else 0.0
    return TrainState(
        step=int(data["step"]),
        config=dict(data["config"]),
        adapter=dict(data["adapter"]),
        optimizer=data["optimizer"],
        scheduler=data["scheduler"],
        rng=data["rng"],
        data_pos=(int(data["data"][0]), int(data["data"][1])),
        elapsed_s=elapsed,
        history=history,
    )


def save_checkpoint(folder: str | os.PathLike, state: TrainState) -> Path:
    """Write ``state`` to ``<folder>/checkpoint/state.pt`` atomically; returns the file."""
    buf = io.BytesIO()
    torch.save(state_to_dict(state), buf)
    return atomic_write_bytes(Path(folder) / CHECKPOINT_NAME, buf.getvalue())


def load_checkpoint(folder: str | os.PathLike) -> TrainState:
    """Read the checkpoint in ``folder`` (a run folder).

    Raises:
        ValueError: there is no checkpoint (the run stopped before its first ``checkpoint_every`` steps), or
            the file is not a runlora_nb checkpoint.
    """
    path = Path(folder) / CHECKPOINT_NAME
    if not path.exists():
        raise ValueError(
            f"checkpoint: run {Path(folder).name} has no checkpoint ({path} is missing); it ended before its "
            "first checkpoint — start it again, or set a smaller checkpoint_every"
        )
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise ValueError(f"checkpoint: {path} cannot be read ({type(err).__name__}: {err})") from err
    if not isinstance(data, dict) or data.get("format") != _FORMAT:
        raise ValueError(f"checkpoint: {path} is not a runlora_nb checkpoint (format {_FORMAT})")
    try:
        return state_from_dict(data)
    except (KeyError, TypeError, ValueError, IndexError) as err:
        raise ValueError(f"checkpoint: {path} is incomplete ({type(err).__name__}: {err})") from err
