"""bitsandbytes bases: dequantize on demand, guard the CPU repack trap, requantize after a merge.

RunLoRA never keeps a dequantized weight: forward dequantizes W (public bitsandbytes functions), uses it and
drops it; backward dequantizes again only when dX is needed.

The CPU repack trap (bitsandbytes ≥ 0.46 on CPUs with AVX512-BF16): one eval-mode forward of a ``Linear4bit``
with an input that needs no grad repacks ``weight.data`` in place for fast inference. Afterwards
``dequantize_4bit`` returns wrong values and backward goes through a kernel without an autograd rule, so the
gradients of earlier layers silently become None. :func:`guard_cpu_repack` switches that path off on every
managed layer, and :func:`dequantizer` refuses a weight that was already repacked.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import torch
from torch import nn

from ..common import quiet
from .base import BaseInfo

__all__ = ["dequantize", "dequantizer", "guard_cpu_repack", "quiet_bnb_logs", "requantize_add"]

# bitsandbytes' known, harmless chatter is filtered by common/quiet.py (at its logger, not here)
quiet_bnb_logs = quiet.install
quiet_bnb_logs()  # idempotent; the package already ran it at import


def _bnb():
    import bitsandbytes  # noqa: F401  (only reached for layers that are already bnb layers)
    import bitsandbytes.functional as F

    return F


def guard_cpu_repack(model: nn.Module, prefix: str = "") -> int:
    """Disable bitsandbytes' in-place CPU repack on every ``Linear4bit`` in ``model``.

    Args:
        model: any module tree.
        prefix: the tree's own path, for error messages (e.g. ``"model.layers.0.mlp.up_proj"``).

    Returns:
        How many ``Linear4bit`` layers were guarded.

    Raises:
        RuntimeError: a layer was already repacked (an eval forward ran before the guard); reload the model.
    """
    count = 0
    for name, module in model.named_modules():
        if hasattr(module, "support_avx512bf16_for_cpu") and hasattr(module.weight, "quant_state"):
            _check_not_packed(module, ".".join(p for p in (prefix, name) if p) or type(module).__name__)
            module.support_avx512bf16_for_cpu = False
            count += 1
    return count


def _check_not_packed(module: nn.Module, name: str) -> None:
    qs = getattr(module.weight, "quant_state", None)
    if qs is not None and getattr(qs, "packing_format_for_cpu", False):
        raise RuntimeError(
            f"{name}: this Linear4bit weight was repacked in place by bitsandbytes' CPU inference path (an "
            "eval-mode forward ran before runlora_nb guarded it), so it can no longer be dequantized. Reload the "
            "model, then wrap it (apply_runlora / from_peft guard it before any forward)."
        )


def _int8_parts(module: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """(CB (o, i) int8, SCB (o,) row scales) wherever bitsandbytes currently keeps them."""
    cb = getattr(module.weight, "CB", None)
    scb = getattr(module.weight, "SCB", None)
    state = getattr(module, "state", None)
    if cb is None and state is not None:
        cb = state.CB
    if scb is None and state is not None:
        scb = state.SCB
    if cb is None:
        cb = module.weight.data
    if scb is None:
        raise RuntimeError(
            "Linear8bitLt has no row scales (SCB): move it to its device first (model.to(...))."
        )
    return cb, scb


def dequantize(module: nn.Module, info: BaseInfo, dtype: torch.dtype | None = None) -> torch.Tensor:
    """The (o, i) weight of a bitsandbytes layer as a new float tensor.

    Args:
        module: a ``Linear4bit`` or ``Linear8bitLt``.
        info: its :class:`~runlora_nb.core.base.BaseInfo`.
        dtype: result dtype (default: the layer's compute dtype).

    Returns:
        (o, i) tensor in ``dtype``.
    """
    F = _bnb()
    dtype = dtype or info.dtype
    if info.kind == "int8":
        cb, scb = _int8_parts(module)
        return F.int8_vectorwise_dequant(cb, scb.to(torch.float32)).to(dtype)
    _check_not_packed(module, "base_layer")
    w = F.dequantize_4bit(module.weight.data, module.weight.quant_state)
    return w.to(dtype)


def dequantizer(module: nn.Module, info: BaseInfo, dtype: torch.dtype) -> Callable[[], torch.Tensor]:
    """A zero-arg callable that dequantizes ``module`` to ``dtype`` each time it is called (nothing cached)."""
    return lambda: dequantize(module, info, dtype)


def requantize_add(module: nn.Module, info: BaseInfo, delta: torch.Tensor, name: str = "base_layer") -> None:
    """W ← quantize(dequantize(W) + delta) in place, for merge / unmerge of a quantized base.

    Args:
        module: ``Linear4bit`` or ``Linear8bitLt``.
        info: its BaseInfo.
        delta: (o, i) float update.
        name: for the warning.

    Warns:
        UserWarning: requantization rounds; merge → unmerge does not return the exact original weight.
    """
    import bitsandbytes as bnb

    warnings.warn(
        f"{name}: merging into a {info.kind} base dequantizes, adds and requantizes the weight; the result is "
        "rounded to the quantization grid, so unmerge will not restore the exact original weight.",
        UserWarning,
        stacklevel=3,
    )
    w = dequantize(module, info, torch.float32) + delta.to(torch.float32)
    device = module.weight.device
    if info.kind == "int8":
        new = bnb.nn.Int8Params(w.to("cpu"), requires_grad=False, has_fp16_weights=False).to(device)
        module.weight = new
        if getattr(module, "state", None) is not None:
            module.state.CB = None
            module.state.SCB = None
        return
    old = module.weight
    qs = old.quant_state
    module.weight = bnb.nn.Params4bit(
        w.to("cpu").to(qs.dtype if qs.dtype.is_floating_point else torch.float32),
        requires_grad=False,
        quant_type=info.kind,
        compress_statistics=qs.nested,
        blocksize=qs.blocksize,
        quant_storage=old.quant_storage if hasattr(old, "quant_storage") else torch.uint8,
        module=module,
    ).to(device)


def quantized_linear(
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    kind: str,
    *,
    compute_dtype: torch.dtype = torch.float32,
    double_quant: bool = True,
    device: str | torch.device = "cpu",
) -> nn.Module:
    """A frozen bitsandbytes layer holding ``weight`` quantized (for benchmarks, tests and tiny models).

    Args:
        weight: (o, i) float weight.
        bias: (o,) or None.
        kind: ``"nf4"``, ``"fp4"`` or ``"int8"``.
        compute_dtype: 4-bit compute dtype (and the bias dtype).
        double_quant: 4-bit only: quantize the block scales too (``compress_statistics``).
        device: target device; quantization happens on the move there.

    Returns:
        A ``Linear4bit`` or ``Linear8bitLt`` with the CPU repack guard applied.

    Raises:
        ValueError: unknown kind.
    """
    import bitsandbytes as bnb

    o, i = weight.shape
    has_bias = bias is not None
    if kind in ("nf4", "fp4"):
        layer = bnb.nn.Linear4bit(
            i,
            o,
            bias=has_bias,
            compute_dtype=compute_dtype,
            compress_statistics=double_quant,
            quant_type=kind,
        )
        layer.weight = bnb.nn.Params4bit(
            weight.detach().float().cpu(),
            requires_grad=False,
            quant_type=kind,
            compress_statistics=double_quant,
            module=layer,
        )
    elif kind == "int8":
        layer = bnb.nn.Linear8bitLt(i, o, bias=has_bias, has_fp16_weights=False, threshold=0.0)
        layer.weight = bnb.nn.Int8Params(
            weight.detach().float().cpu(), requires_grad=False, has_fp16_weights=False
        )
    else:
        raise ValueError(f"quantized_linear: kind must be 'nf4', 'fp4' or 'int8', got {kind!r}")
    if has_bias:
        layer.bias = nn.Parameter(bias.detach().to(compute_dtype).cpu(), requires_grad=False)
    layer = layer.to(device)
    guard_cpu_repack(layer)
    return layer
