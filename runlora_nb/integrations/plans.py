"""Per-module chain plans of a model's RunLoRA layers, as a tidy table."""

from __future__ import annotations

import math

import pandas as pd
from torch import nn

from .inject import runlora_layers

__all__ = ["plan_table"]


def plan_table(model: nn.Module) -> pd.DataFrame:
    """Per-module chain plan of the most recent call of every RunLoRA layer in ``model``.

    Columns: module, in_features, out_features, rank, tokens, needs, fwd, bwd, mode, gflops, predicted_ms,
    reason. Layers not called yet are listed with empty plan columns.
    """
    rows = []
    for name, layer in runlora_layers(model):
        info = layer.runlora_info
        plan = layer.last_plan
        key = layer._runlora_last_key
        rows.append(
            {
                "module": name,
                "in_features": info.in_features,
                "out_features": info.out_features,
                "rank": key[7] if key else None,
                "tokens": key[0] if key else None,
                "needs": key[1].label() if key else "",
                "fwd": plan.fwd if plan else "",
                "bwd": plan.bwd if plan else "",
                "mode": plan.mode if plan else "",
                "gflops": plan.flops / 1e9 if plan else math.nan,
                "predicted_ms": (plan.predicted_s or math.nan) * 1e3 if plan else math.nan,
                "reason": plan.reason if plan else "",
            }
        )
    return pd.DataFrame(rows)
