"""Switch a tuned model's adapters off for a block and back on: the base model, with no reload.

Works on RunLoRA layers (``enable_adapter``) and PEFT models (``disable_adapter``). Used to compare base and
tuned answers from one model object (evaluation, chat A/B, parity checks).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from torch import nn

__all__ = ["adapters_disabled"]


@contextlib.contextmanager
def adapters_disabled(model: nn.Module) -> Iterator[nn.Module]:
    """Run the block on the base model: every RunLoRA / PEFT adapter off, restored afterwards (no reload).

    Raises:
        ValueError: the model has no adapters, or a RunLoRA layer is merged (its base weight holds sAB).
    """
    from ..nn.layer import RunLoRALinear
    from .inject import runlora_layers

    if hasattr(model, "peft_config") and hasattr(model, "disable_adapter"):
        with model.disable_adapter():
            yield model
        return
    layers = [(p, m) for p, m in runlora_layers(model) if isinstance(m, RunLoRALinear)]
    if not layers:
        raise ValueError(
            f"adapters_disabled: {type(model).__name__} has no RunLoRA or PEFT adapters to switch off; pass the tuned "
            "model (apply_runlora / get_peft_model / load_adapter)"
        )
    merged = [p for p, m in layers if m.merged]
    if merged:
        raise ValueError(
            f"adapters_disabled: {merged[0]} is merged, so its base cannot be recovered; unmerge() it first"
        )
    before = [m.adapter_enabled for _, m in layers]
    try:
        for _, m in layers:
            m.enable_adapter(False)
        yield model
    finally:
        for (_, m), on in zip(layers, before):
            m.enable_adapter(on)
