"""What the engine builds before its first step: the task, the adapters, the lr schedule, checkpointing.

Free functions of the config and the model, so that each can be read (and tested) without a training loop.
"""

from __future__ import annotations

import math
import time
import uuid
from pathlib import Path

import torch
from torch import nn

from ..assets.datasets import dataset_kind
from ..common.paths import cache_dir
from ..integrations.inject import apply_runlora, check_rank, find_targets, get_peft_model
from .config import FineTuneConfig

__all__ = [
    "adapter_is_finite",
    "add_adapters",
    "default_adapter_dir",
    "enable_checkpointing",
    "lr_factor",
    "make_optimizer",
    "task_of",
    "trainable",
]


def enable_checkpointing(model: nn.Module) -> None:
    """Turn on activation (gradient) checkpointing with transformers 5's name, or 4's."""
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def lr_factor(step: int, cfg: FineTuneConfig) -> float:
    """Multiplier of ``cfg.lr`` at optimizer step ``step`` (0-based): linear warm-up, then the schedule."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return 1.0
    progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    if cfg.schedule == "linear":
        return max(0.0, 1.0 - progress)
    return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))


def task_of(cfg: FineTuneConfig) -> tuple[str, str]:
    """(data task, model task): the config's task, else the dataset's default."""
    task = cfg.task or ("causal-lm" if dataset_kind(cfg.dataset) == "text" else "instruction")
    return task, ("sequence-classification" if task == "classification" else "causal-lm")


def add_adapters(model: nn.Module, cfg: FineTuneConfig) -> nn.Module:
    """Add the config's LoRA adapters with the config's backend (runlora_nb layers or PEFT's)."""
    targets = list(cfg.targets) if isinstance(cfg.targets, tuple) else cfg.targets
    if cfg.backend == "runlora":
        return apply_runlora(model, r=cfg.r, alpha=cfg.alpha, dropout=cfg.dropout, target_modules=targets,
                             chain=cfg.chain, use_rslora=cfg.use_rslora)  # fmt: skip
    import peft  # only the PEFT backend needs it loaded

    # PEFT drops target names that match nothing and allocates any rank: refuse both as apply_runlora does
    check_rank(model, find_targets(model, targets), cfg.r)
    if cfg.quantization:
        from ..core.quant import guard_cpu_repack  # imports bitsandbytes

        guard_cpu_repack(model)
    lcfg = peft.LoraConfig(r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, target_modules=targets,
                           use_rslora=cfg.use_rslora)  # fmt: skip
    return get_peft_model(model, lcfg)


def trainable(model: nn.Module) -> dict[str, nn.Parameter]:
    """The model's trainable parameters by name (the adapter)."""
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def adapter_is_finite(model: nn.Module) -> bool:
    """True when every trainable parameter is finite."""
    return all(bool(torch.isfinite(p).all()) for p in trainable(model).values())


def make_optimizer(model: nn.Module, cfg: FineTuneConfig) -> torch.optim.AdamW:
    """AdamW over the adapter: one group at ``cfg.lr``, or with LoRA+ the B matrices in a second group at
    ``cfg.lr × cfg.lora_plus_ratio`` (the scheduler scales both alike). The first group is the A side, so the
    lr a step event reports is ``cfg.lr``'s schedule."""
    params = trainable(model)
    if cfg.lora_plus_ratio is None:
        return torch.optim.AdamW(list(params.values()), lr=cfg.lr, weight_decay=cfg.weight_decay)
    b = [p for n, p in params.items() if "lora_B" in n]
    rest = [p for n, p in params.items() if "lora_B" not in n]
    if not b:
        raise ValueError(
            "train.setup: lora_plus_ratio is set but the model has no lora_B parameters; unset lora_plus_ratio"
        )
    groups = [{"params": rest, "lr": cfg.lr}, {"params": b, "lr": cfg.lr * cfg.lora_plus_ratio}]
    return torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)


def default_adapter_dir(backend: str) -> Path:
    """A fresh folder ``<cache>/adapters/<YYYYmmdd-HHMMSS>-<backend>-<8 hex>`` for a run that names none."""
    return cache_dir("adapters") / f"{time.strftime('%Y%m%d-%H%M%S')}-{backend}-{uuid.uuid4().hex[:8]}"
