"""Resumable training state: adapter, optimizer, scheduler, RNG states, data position and step, in one file.

:func:`trainer_state` snapshots a :class:`~runlora_nb.tuning.FineTuner` between steps; :func:`save_checkpoint`
writes it to ``<run>/checkpoint/state.pt`` atomically (a temporary file and ``os.replace``: a kill leaves the
previous checkpoint, never half a file); :func:`restore_trainer` puts a loaded state back so that the next step
is the one the interrupted run would have taken: at dropout 0 in fp32 the resumed run's adapter equals an
uninterrupted run's bit for bit (the dropout masks' seeds come from torch's generator, restored too).
Everything is stored as tensors, numbers, strings, lists and dicts, so it loads with ``weights_only=True``.
"""

from __future__ import annotations

import io
import math
import os
import random
import time
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from ..common.paths import atomic_write_bytes
from .events import EvalEvent, SampleEvent, StepEvent

if TYPE_CHECKING:
    from .engine import FineTuner

__all__ = [
    "CHECKPOINT_NAME",
    "adapter_is_finite",
    "check_config",
    "load_checkpoint",
    "restore_trainer",
    "save_checkpoint",
    "saved_elapsed",
    "trainer_state",
]

CHECKPOINT_NAME = "checkpoint/state.pt"
_FORMAT = 1
_COMPARED = ("model", "dataset", "task", "r", "alpha", "dropout", "targets", "quantization", "dtype", "lr",
             "weight_decay", "steps", "batch_size", "seq_len", "grad_accum", "warmup_steps", "schedule",
             "max_grad_norm", "seed", "backend", "chain")  # fmt: skip


def _rng_state() -> dict[str, Any]:
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "python": random.getstate(),
        "numpy": [name, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(gauss)],
    }


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if state.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))


def _trainable(tuner: FineTuner) -> dict[str, torch.nn.Parameter]:
    return {n: p for n, p in tuner.model.named_parameters() if p.requires_grad}


def adapter_is_finite(tuner: FineTuner) -> bool:
    """True when every trainable parameter of the tuner's model is finite."""
    return all(bool(torch.isfinite(p).all()) for p in _trainable(tuner).values())


def trainer_state(tuner: FineTuner) -> dict[str, Any]:
    """Everything needed to continue ``tuner`` exactly where it is (call between steps).

    Returns:
        A dict: format, step, config (dict), adapter (name → tensor), optimizer, scheduler, rng (torch, cuda,
        python, numpy), data ([epoch, next batch index]), elapsed_s (seconds spent so far) and history
        (steps, evals, samples as dicts).
    """
    return {
        "format": _FORMAT,
        "step": tuner.step,
        "config": {k: getattr(tuner.config, k) for k in _COMPARED},
        "adapter": {n: p.detach().to("cpu", copy=True) for n, p in _trainable(tuner).items()},
        "optimizer": tuner.optimizer.state_dict(),
        "scheduler": tuner.scheduler.state_dict(),
        "rng": _rng_state(),
        "data": list(tuner._data_pos),
        "elapsed_s": _elapsed(tuner),
        "history": {
            "steps": [asdict(s) for s in tuner.history.steps],
            "evals": [asdict(e) for e in tuner.history.evals],
            "samples": [asdict(s) for s in tuner.history.samples],
        },
    }


def _elapsed(tuner: FineTuner) -> float:
    t0 = getattr(tuner, "_t0", None)
    if t0 is not None:
        return time.perf_counter() - t0
    return float(tuner.history.steps[-1].elapsed_s) if tuner.history.steps else 0.0


def saved_elapsed(state: dict[str, Any]) -> float:
    """Seconds the run had spent when ``state`` was saved (older checkpoints: the last step's elapsed_s)."""
    if isinstance(state.get("elapsed_s"), int | float):
        return float(state["elapsed_s"])
    steps = state.get("history", {}).get("steps") or []
    return float(steps[-1].get("elapsed_s", 0.0)) if steps else 0.0


def restore_trainer(tuner: FineTuner, state: dict[str, Any]) -> None:
    """Put ``state`` (from :func:`trainer_state`) back into a prepared tuner; the RNG states are set last.

    Raises:
        ValueError: the state belongs to a run with another config, or its adapter names do not match.
    """
    check_config(tuner.config, state)
    params = _trainable(tuner)
    if set(params) != set(state["adapter"]):
        missing = sorted(set(state["adapter"]) ^ set(params))[:4]
        raise ValueError(f"checkpoint: adapter parameters differ from the model's (e.g. {missing})")
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(state["adapter"][name])
    tuner.optimizer.load_state_dict(state["optimizer"])
    tuner.scheduler.load_state_dict(state["scheduler"])
    tuner.step = int(state["step"])
    tuner._data_pos = (int(state["data"][0]), int(state["data"][1]))
    hist = state["history"]
    tuner.history.steps[:] = [StepEvent(**s) for s in hist["steps"]]
    tuner.history.evals[:] = [EvalEvent(**e) for e in hist["evals"]]
    tuner.history.samples[:] = [SampleEvent(**s) for s in hist["samples"]]
    _set_rng_state(state["rng"])


def check_config(cfg: Any, state: dict[str, Any]) -> None:
    """Refuse a config that differs from the one the checkpoint was written with (the compared fields).

    Raises:
        ValueError: the fields that differ, with the checkpoint's and the given values.
    """
    wrong = {
        k: (v, getattr(cfg, k)) for k, v in state["config"].items() if _norm(getattr(cfg, k)) != _norm(v)
    }
    if wrong:
        raise ValueError(
            "checkpoint: the checkpoint was written by a run with another config "
            + ", ".join(f"{k}={a!r} (now {b!r})" for k, (a, b) in wrong.items())
            + "; resume with the run's own config (FineTuner.resume(run_id))"
        )


def _norm(v: Any) -> Any:
    if isinstance(v, list):
        return tuple(v)
    if isinstance(v, float) and math.isnan(v):
        return "nan"
    return v


def save_checkpoint(run_dir: str | os.PathLike, state: dict[str, Any]) -> Path:
    """Write ``state`` to ``<run_dir>/checkpoint/state.pt`` atomically; returns the file."""
    buf = io.BytesIO()
    torch.save(state, buf)
    return atomic_write_bytes(Path(run_dir) / CHECKPOINT_NAME, buf.getvalue())


def load_checkpoint(run_dir: str | os.PathLike) -> dict[str, Any]:
    """Read a run's checkpoint.

    Raises:
        ValueError: the run has no checkpoint (it stopped before its first ``checkpoint_every`` steps), or the
            file is not a runlora_nb checkpoint.
    """
    path = Path(run_dir) / CHECKPOINT_NAME
    if not path.exists():
        raise ValueError(
            f"checkpoint: run {Path(run_dir).name} has no checkpoint ({path} is missing); it ended before its "
            "first checkpoint — start it again, or set a smaller checkpoint_every"
        )
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise ValueError(f"checkpoint: {path} cannot be read ({type(err).__name__}: {err})") from err
    if not isinstance(state, dict) or state.get("format") != _FORMAT:
        raise ValueError(f"checkpoint: {path} is not a runlora_nb checkpoint (format {_FORMAT})")
    return state
