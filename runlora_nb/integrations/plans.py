"""Per-module chain plans of a model's RunLoRA layers: a tidy table, and record / pin for reproducible reruns."""

from __future__ import annotations

import math
from collections.abc import Mapping

import pandas as pd
from torch import nn

from ..nn.layer import _check_chain
from .inject import runlora_layers

__all__ = ["pin_plans", "plan_table", "record_plans"]


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


def record_plans(model: nn.Module) -> dict[str, dict[str, object]]:
    """The plan of the most recent call of every called RunLoRA layer, JSON-ready, for a run's config.

    Returns:
        module path → :meth:`~runlora_nb.planning.planner.ChainPlan.to_dict`; layers not called yet are left out.
    """
    return {name: layer.last_plan.to_dict() for name, layer in runlora_layers(model) if layer.last_plan}


def pin_plans(model: nn.Module, plans: Mapping[str, Mapping[str, object]]) -> nn.Module:
    """Pin each named RunLoRA layer to the pair of a recorded plan (from :func:`record_plans`), in place.

    With the same pairs, an fp32 model at dropout 0 on the same device and torch build gives bit-identical
    outputs, whatever this machine's calibration or plan cache says. Every plan is checked before any layer
    changes.

    Args:
        model: a model with RunLoRA layers (``apply_runlora`` or ``from_peft``).
        plans: module path → plan dict.

    Returns:
        ``model``.

    Raises:
        ValueError: a path names no RunLoRA layer, a plan is malformed, or a merged pair meets dropout.
        TypeError: ``plans`` is not a mapping of mappings.
    """
    if not isinstance(plans, Mapping):
        raise TypeError(f"pin_plans: plans must map module paths to plan dicts, got {type(plans).__name__}")
    layers = dict(runlora_layers(model))
    missing = sorted(set(plans) - set(layers))
    if missing:
        raise ValueError(
            f"pin_plans: {missing[:3]} name no RunLoRA layer of {type(model).__name__}; recorded plans must come "
            f"from the same model and targets (layers here: {sorted(layers)[:3]}, …)"
        )
    checked = {
        name: _check_chain(plan, layers[name]._runlora_max_dropout(), name) for name, plan in plans.items()
    }
    for name, pair in checked.items():
        layers[name].set_chain(pair)
    return model
