"""The LoRA X-ray: what each adapter has learnt, per module, from its factors alone.

For a LoRA module with A (r×i), B (o×r) and scaling s, the update is ΔW = s·B·A (o×i). Its singular values come
from an r×r problem: with QR factors B = Q_B·R_B and Aᵀ = Q_A·R_A (Q orthonormal columns), s·B·A =
Q_B·(s·R_B·R_Aᵀ)·Q_Aᵀ, so σ(s·B·A) = σ(s·R_B·R_Aᵀ). That costs O((i + o)·r²), never the o×i matrix, so it can run
after every evaluation of a fine-tune. :func:`adapter_xray` reads a live model (RunLoRA layers, PEFT LoRA
layers, PEFT layers converted by ``from_peft``); :func:`saved_adapter_xray` reads a saved adapter folder without
the base model.

Effective rank is the *entropy effective rank* (Roy & Vetterli, 2007): with p_k = σ_k / Σ_j σ_j,
erank = exp(−Σ_k p_k·log p_k). It is 1 for a rank-1 update, r when all r singular values are equal, and 0 for a
zero update (zero-initialised B), by convention rather than NaN.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from pathlib import Path

import pandas as pd
import torch
from torch import nn

from ..integrations.adapter_files import read_config, read_tensors
from ..nn.layer import ChainDispatch

__all__ = ["XRAY_COLUMNS", "adapter_xray", "effective_rank", "lora_factors", "saved_adapter_xray", "svals"]

XRAY_COLUMNS = (
    "module",
    "in_features",
    "out_features",
    "r",
    "scaling",
    "norm",
    "svals",
    "effective_rank",
    "grad_A",
    "grad_B",
    "chain",
)
TOP_K = 8  # singular values kept per module: enough to see the spectrum's shape in a table


def svals(a: torch.Tensor, b: torch.Tensor, scaling: float) -> torch.Tensor:
    """Singular values of ``scaling · b @ a``, from the r×r core (float64, descending).

    Args:
        a: A, shape (r, i).
        b: B, shape (o, r).
        scaling: s.

    Returns:
        Shape (min(r, i, o),): σ_1 ≥ … ≥ 0.
    """
    a64, b64 = a.detach().to(torch.float64), b.detach().to(torch.float64)
    _, r_b = torch.linalg.qr(b64)  # (min(o, r), r)
    _, r_a = torch.linalg.qr(a64.T)  # (min(i, r), r)
    core = scaling * (r_b @ r_a.T)  # (min(o, r), min(i, r)): same nonzero singular values as s·B·A
    return torch.linalg.svdvals(core)


def effective_rank(sv: torch.Tensor) -> float:
    """Entropy effective rank exp(−Σ p log p), p = σ / Σσ; 0 when every σ is 0 (a zero update).

    Args:
        sv: singular values, shape (k,).
    """
    total = float(sv.sum())
    if not total > 0.0:
        return 0.0
    p = sv[sv > 0] / total
    return float(torch.exp(-(p * p.log()).sum()))


def lora_factors(module: nn.Module) -> tuple[torch.Tensor, torch.Tensor, float] | None:
    """(A, B, s) of a LoRA module's active adapter, or None for a module that is not one.

    RunLoRALinear keeps ``lora_A`` / ``lora_B`` as ``nn.Linear``; PEFT LoRA layers (converted or not) keep
    ``nn.ModuleDict`` per adapter name and ``scaling`` as a dict.
    """
    lora_a, lora_b = getattr(module, "lora_A", None), getattr(module, "lora_B", None)
    if isinstance(lora_a, nn.Linear) and isinstance(lora_b, nn.Linear):
        return lora_a.weight, lora_b.weight, float(module.scaling)
    if isinstance(lora_a, nn.ModuleDict) and isinstance(lora_b, nn.ModuleDict):
        active = getattr(module, "active_adapters", None) or list(lora_a)
        names = [n for n in active if n in lora_a and n in lora_b]
        if names:  # one adapter is what runlora_nb trains; with several, the first active one is shown
            name = names[0]
            return lora_a[name].weight, lora_b[name].weight, float(module.scaling[name])
    return None


def _training_plan(layer: ChainDispatch):
    """The plan of the layer's latest training call (one that makes dA or dB), else of its last call.

    After an evaluation the last call is a no-grad forward, whose plan says nothing about how the layer trains.
    """
    plans, last = layer._runlora_plans, layer._runlora_last_key
    if last is not None and last[1].adapter:
        return plans.get(last)
    training = [plan for key, plan in plans.items() if key[1].adapter]  # dict order: first planned first
    return training[-1] if training else layer.last_plan


def _chain(module: nn.Module) -> str:
    """The chain pair the layer trains with ("fwd+bwd"), its pinned pair or mode before a call, "peft" for PEFT."""
    if not isinstance(module, ChainDispatch):
        return "peft"
    plan = _training_plan(module)
    if plan is not None:
        return f"{plan.fwd}+{plan.bwd}"
    chain = module.runlora_chain
    return "+".join(chain) if isinstance(chain, tuple) else f"{chain} (not called yet)"


def _grad_norm(p: torch.Tensor) -> float:
    return float(p.grad.detach().float().norm()) if p.grad is not None else math.nan


def _row(name: str, a: torch.Tensor, b: torch.Tensor, s: float, chain: str, grads: bool) -> dict:
    sv = svals(a, b, s)
    return {
        "module": name,
        "in_features": int(a.shape[1]),
        "out_features": int(b.shape[0]),
        "r": int(a.shape[0]),
        "scaling": s,
        "norm": float(sv.square().sum().sqrt()),  # ‖sBA‖_F = sqrt(Σσ²), exact from the core
        "svals": [float(v) for v in sv[:TOP_K]],
        "effective_rank": effective_rank(sv),
        "grad_A": _grad_norm(a) if grads else math.nan,
        "grad_B": _grad_norm(b) if grads else math.nan,
        "chain": chain,
    }


def _lora_modules(model: nn.Module) -> Iterator[tuple[str, nn.Module, tuple]]:
    for name, module in model.named_modules():
        factors = lora_factors(module)
        if factors is not None:
            yield name, module, factors


@torch.no_grad()
def adapter_xray(model: nn.Module) -> pd.DataFrame:
    """One row per LoRA module of ``model``: size, scaling, ‖sBA‖_F, top singular values, effective rank, grads.

    Args:
        model: a model with RunLoRA layers (``apply_runlora`` / ``from_peft``) or PEFT LoRA layers.

    Returns:
        Columns :data:`XRAY_COLUMNS`: module, in_features, out_features, r, scaling (s), norm (‖sBA‖_F),
        svals (the top :data:`TOP_K` singular values of sBA, a list), effective_rank (entropy effective rank,
        see the module docstring), grad_A / grad_B (‖∇A‖_F, ‖∇B‖_F from ``.grad``; NaN without one, e.g. after
        ``zero_grad(set_to_none=True)``), chain ("fwd+bwd" of the layer's latest training plan, else of its last
        plan; "peft" for PEFT layers).
        Empty (with these columns) for a model without LoRA modules.
    """
    rows = [_row(name, a, b, s, _chain(mod), True) for name, mod, (a, b, s) in _lora_modules(model)]
    return pd.DataFrame(rows, columns=list(XRAY_COLUMNS))


def _scaling(config: Mapping, r: int) -> float:
    alpha = float(config["lora_alpha"])
    return alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r


def _module_name(key: str) -> str:
    """``base_model.model.layers.0.q_proj.lora_A.weight`` → ``layers.0.q_proj`` (PEFT's save prefix dropped)."""
    stem = key.rsplit(".lora_", 1)[0]
    return stem.removeprefix("base_model.model.")


def saved_adapter_xray(directory: str | Path, plans: Mapping[str, Mapping] | None = None) -> pd.DataFrame:
    """:func:`adapter_xray` of a saved PEFT-format adapter folder, without loading the base model.

    Args:
        directory: a folder with ``adapter_config.json`` and ``adapter_model.safetensors``.
        plans: optional recorded plans (module path → plan dict, as in a run's config) for the chain column;
            without them the column reads "saved".

    Returns:
        Columns :data:`XRAY_COLUMNS`; grad_A / grad_B are NaN (a saved adapter has no gradients).

    Raises:
        AdapterError: a missing or malformed config or weights file.
    """
    directory = Path(directory).expanduser()
    config = read_config(directory)
    tensors = read_tensors(directory)
    plans = plans or {}
    rows = []
    for key in sorted(k for k in tensors if ".lora_A." in k):
        b = tensors.get(key.replace(".lora_A.", ".lora_B."))
        if b is None:
            continue
        a = tensors[key]
        name = _module_name(key)
        plan = plans.get(name) or plans.get(f"base_model.model.{name}")
        chain = f"{plan['fwd']}+{plan['bwd']}" if plan else "saved"
        rows.append(_row(name, a, b, _scaling(config, int(a.shape[0])), chain, False))
    return pd.DataFrame(rows, columns=list(XRAY_COLUMNS))
