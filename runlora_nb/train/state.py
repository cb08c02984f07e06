"""The engine's resumable state between two steps, as inert data: :class:`TrainState`.

The engine builds one with ``FineTuner.snapshot()`` and takes one back through ``FineTuner(resume_from=...)``;
:mod:`.checkpoint` turns it into a file and back without knowing the engine. Everything in it is tensors,
numbers, strings, lists and dicts, so a checkpoint loads with ``weights_only=True``.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

__all__ = ["COMPARED_FIELDS", "TrainState", "check_config", "rng_state", "set_rng_state"]

#: Config fields a resumed run must share with the run that wrote the checkpoint.
COMPARED_FIELDS = ("model", "dataset", "task", "r", "alpha", "dropout", "targets", "quantization", "dtype", "lr",
                   "weight_decay", "steps", "batch_size", "seq_len", "grad_accum", "warmup_steps", "schedule",
                   "max_grad_norm", "seed", "backend", "chain", "use_rslora", "lora_plus_ratio")  # fmt: skip


@dataclass(frozen=True)
class TrainState:
    """Everything needed to continue a run exactly where it was.

    Attributes:
        step: optimizer steps taken.
        config: the run's :data:`COMPARED_FIELDS` (name → value).
        adapter: trainable parameter name → a CPU copy of its tensor.
        optimizer: ``optimizer.state_dict()``.
        scheduler: ``scheduler.state_dict()``.
        rng: torch, cuda, python and numpy generator states (see :func:`rng_state`).
        data_pos: (epoch, index of the next batch in it).
        elapsed_s: seconds the run had spent.
        history: the run's steps, evals and samples as lists of dicts (see ``History.to_dict``).
    """

    step: int
    config: dict[str, Any]
    adapter: dict[str, torch.Tensor] = field(repr=False)
    optimizer: dict[str, Any] = field(repr=False)
    scheduler: dict[str, Any] = field(repr=False)
    rng: dict[str, Any] = field(repr=False)
    data_pos: tuple[int, int] = (0, 0)
    elapsed_s: float = 0.0
    history: dict[str, list[dict[str, Any]]] = field(default_factory=dict, repr=False)


def rng_state() -> dict[str, Any]:
    """The torch, CUDA, Python and numpy generator states, as tensors and plain values."""
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "python": random.getstate(),
        "numpy": [name, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(gauss)],
    }


def set_rng_state(state: dict[str, Any]) -> None:
    """Put back the generator states :func:`rng_state` returned (after a round trip through a file)."""
    torch.set_rng_state(state["torch"])
    if state.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))


def check_config(cfg: Any, state: TrainState) -> None:
    """Refuse a config that differs from the one ``state`` was written with (the compared fields).

    Raises:
        ValueError: the fields that differ, with the checkpoint's and the given values.
    """
    wrong = {k: (v, getattr(cfg, k)) for k, v in state.config.items() if _norm(getattr(cfg, k)) != _norm(v)}
    if wrong:
        raise ValueError(
            "checkpoint: the checkpoint was written by a run with another config "
            + ", ".join(f"{k}={a!r} (now {b!r})" for k, (a, b) in wrong.items())
            + "; resume with the run's own config (runlora_nb.ledger.resume_tuner(run_id))"
        )


def _norm(v: Any) -> Any:
    if isinstance(v, list):
        return tuple(v)
    if isinstance(v, float) and math.isnan(v):
        return "nan"
    return v
