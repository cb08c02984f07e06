"""Training-memory estimate for a model, rank and batch shape (the Model tab's "Estimate memory")."""

from __future__ import annotations

import pandas as pd
from torch import nn

from .memory_ledger import MemoryLedger

__all__ = ["estimate_memory"]


def estimate_memory(
    model: nn.Module, *, batch: int, seq: int, r: int, dropout: float = 0.05, target_modules="all-linear"
) -> pd.DataFrame:
    """Training memory for a choice, with PEFT and with runlora_nb, predicted by the :class:`MemoryLedger`
    (activations from six tiny probe forwards, exact for transformer blocks; no full-size forward).

    Returns:
        One row per backend: weights_bytes, adapter_bytes (params + grads + 2 AdamW moments), activation_bytes,
        temporaries_bytes, total_bytes.
    """
    ledger = MemoryLedger(model, r=r, alpha=2 * r, dropout=dropout, target_modules=target_modules)
    pred = ledger.predict(batch, seq)
    pred["adapter_bytes"] = pred["adapter_bytes"] + pred["grad_bytes"] + pred["optimizer_bytes"]
    cols = [
        "backend",
        "weights_bytes",
        "adapter_bytes",
        "activation_bytes",
        "temporaries_bytes",
        "total_bytes",
    ]
    return pred[cols]
