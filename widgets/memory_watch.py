"""Live memory of a fine-tune against the memory ledger's prediction: the state behind the panel's memory chart.

Before a run trains, :func:`predict_memory` asks :class:`~runlora_nb.measure.memory_ledger.MemoryLedger` what it
should take (activations from six tiny probe forwards, the total as a lower bound of the process's peak). While
it trains, every step event carries what was measured: the saved-tensor bytes counted exactly with
``saved_tensors_hooks`` and the peak (the process's RSS on the CPU, the allocator's peak on CUDA). No widget is
imported here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from runlora_nb.train import FineTuneConfig, History

__all__ = ["MemoryPrediction", "measured_memory", "predict_memory"]


@dataclass(frozen=True)
class MemoryPrediction:
    """What the memory ledger predicted for one run (bytes).

    Attributes:
        activation_bytes: what autograd keeps for backward (the saved tensors).
        total_bytes: weights, adapters, gradients, optimizer, activations, temporaries and the process: a lower
            bound of the step's peak.
        on_cuda: the prediction is of device memory (the peak to compare is the allocator's).
    """

    activation_bytes: int
    total_bytes: int
    on_cuda: bool = False


def predict_memory(config: FineTuneConfig, base_model: Any = None) -> MemoryPrediction:
    """The memory ledger's prediction for ``config`` (one micro-batch of ``batch_size × seq_len``).

    Args:
        config: the run.
        base_model: the base model without adapters (e.g. the Model panel's loaded one); default: loaded from
            the zoo with the config's dtype and quantization.
    """
    from runlora_nb.assets.zoo import load_model
    from runlora_nb.measure.memory_ledger import MemoryLedger

    if base_model is None:
        base_model, _ = load_model(config.model, dtype=config.dtype, quantization=config.quantization)
    targets = list(config.targets) if isinstance(config.targets, tuple) else config.targets
    ledger = MemoryLedger(base_model, r=config.r, alpha=config.alpha, dropout=config.dropout,
                          target_modules=targets, backends=(config.backend,))  # fmt: skip
    row = ledger.predict(config.batch_size, config.seq_len).iloc[0]
    on_cuda = any(p.is_cuda for p in base_model.parameters())
    return MemoryPrediction(int(row["activation_bytes"]), int(row["total_bytes"]), on_cuda)


def measured_memory(history: History) -> dict[str, list]:
    """``{"step": [...], "saved_bytes": [...], "peak_bytes": [...]}`` from a run's step events (None: not
    measured, e.g. saved bytes under activation checkpointing)."""
    steps = list(history.steps)
    return {
        "step": [s.step for s in steps],
        "saved_bytes": [s.saved_bytes for s in steps],
        "peak_bytes": [s.peak_mem_bytes for s in steps],
    }
