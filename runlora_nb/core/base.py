"""What a RunLoRA layer can wrap, and how to reach the base weight without copying it.

Supported bases: ``torch.nn.Linear`` (weight stored (o, i)), transformers' ``Conv1D`` (GPT-2; weight stored
(i, o)), and bitsandbytes ``Linear4bit`` (nf4 / fp4) and ``Linear8bitLt`` (int8), whose weight is dequantized on
demand by :mod:`runlora_nb.core.quant`. Optional packages are looked up in ``sys.modules`` only: a Conv1D or bnb layer
cannot exist unless its package was imported, so the core never imports transformers or bitsandbytes itself.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

__all__ = ["BaseInfo", "describe_base", "is_supported_base"]

BaseKind = Literal["linear", "conv1d", "nf4", "fp4", "int8"]


@dataclass(frozen=True)
class BaseInfo:
    """Shape and storage of a base layer.

    Attributes:
        kind: ``"linear"``, ``"conv1d"``, ``"nf4"``, ``"fp4"`` or ``"int8"``.
        in_features: i.
        out_features: o.
        dtype: dtype of the base products (float weight dtype, or a quantized layer's compute dtype).
        device: where the weight lives.
    """

    kind: BaseKind
    in_features: int
    out_features: int
    dtype: torch.dtype
    device: torch.device

    @property
    def quantized(self) -> bool:
        return self.kind in ("nf4", "fp4", "int8")

    @property
    def conv1d(self) -> bool:
        return self.kind == "conv1d"


def _conv1d_type():
    mod = sys.modules.get("transformers.pytorch_utils")
    return getattr(mod, "Conv1D", None)


def _bnb_types():
    nn_mod = sys.modules.get("bitsandbytes.nn")
    if nn_mod is None:
        return None, None
    return getattr(nn_mod, "Linear4bit", None), getattr(nn_mod, "Linear8bitLt", None)


def is_supported_base(module: nn.Module) -> bool:
    """True for the layer types :func:`describe_base` accepts."""
    try:
        describe_base(module)
    except TypeError:
        return False
    return True


def describe_base(module: nn.Module, name: str = "base_layer") -> BaseInfo:
    """Describe a base layer.

    Args:
        module: the layer to wrap.
        name: how to call it in error messages (e.g. its path in the model).

    Returns:
        Its :class:`BaseInfo`.

    Raises:
        TypeError: the module is not nn.Linear, transformers Conv1D, or bitsandbytes Linear4bit/Linear8bitLt.
    """
    lin4, lin8 = _bnb_types()
    if lin4 is not None and isinstance(module, lin4):
        qtype = getattr(module.weight.quant_state, "quant_type", None) if module.weight.quant_state else None
        qtype = qtype or getattr(module.weight, "quant_type", "nf4")
        dtype = module.compute_dtype or torch.float32
        return BaseInfo(qtype, module.in_features, module.out_features, dtype, module.weight.device)
    if lin8 is not None and isinstance(module, lin8):
        # int8 layers have no compute dtype: products follow the input's dtype (fp32 until one is seen)
        return BaseInfo("int8", module.in_features, module.out_features, torch.float32, module.weight.device)
    if isinstance(module, nn.Linear):
        w = module.weight
        return BaseInfo("linear", module.in_features, module.out_features, w.dtype, w.device)
    conv1d = _conv1d_type()
    if conv1d is not None and isinstance(module, conv1d):
        w = module.weight  # (i, o)
        return BaseInfo("conv1d", w.shape[0], w.shape[1], w.dtype, w.device)
    raise TypeError(
        f"{name}: RunLoRALinear wraps torch.nn.Linear, transformers Conv1D or bitsandbytes Linear4bit/"
        f"Linear8bitLt, not {type(module).__module__}.{type(module).__qualname__}. Target a linear layer "
        f"(e.g. target_modules=['q_proj', 'v_proj']) or leave this module out."
    )
