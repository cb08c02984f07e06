"""Training-memory estimate for a model, rank and batch shape, measured on the real model."""

from __future__ import annotations

import pandas as pd
import torch
from torch import nn

from ..core.memory import SavedTensorRecorder
from .model_race import adapter_variants, random_batch

__all__ = ["estimate_memory"]


def estimate_memory(
    model: nn.Module, *, batch: int, seq: int, r: int, dropout: float = 0.05, target_modules="all-linear"
) -> pd.DataFrame:
    """Training memory for a choice, measured on the real model: weights, adapters + AdamW state, and the
    activations autograd keeps (exact, one forward each) with PEFT and with runlora_nb.

    Returns:
        One row per backend: weights_bytes, adapter_bytes (params + grads + 2 AdamW moments), activation_bytes,
        total_bytes.
    """
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    variants = adapter_variants(
        model, r=r, alpha=2 * r, dropout=dropout, target_modules=target_modules, backends=("peft", "runlora")
    )
    data = random_batch(model, batch, seq)
    rows = []
    with torch.random.fork_rng(devices=[]):
        for key, m in variants.items():
            trainable = sum(p.numel() * p.element_size() for p in m.parameters() if p.requires_grad)
            with SavedTensorRecorder(m) as rec:
                m(**data)
            acts = rec.activation_bytes()
            rows.append(
                {
                    "backend": key,
                    "weights_bytes": weights,
                    "adapter_bytes": 4 * trainable,
                    "activation_bytes": acts,
                    "total_bytes": weights + 4 * trainable + acts,
                }
            )
    return pd.DataFrame(rows)
