"""One autograd function that runs a chosen (forward, backward) chain pair.

It keeps exactly one activation for backward, the input X (and only when an adapter gradient is needed). XA is
recomputed, the dropout mask is regenerated from a seed, a quantized base weight is dequantized again when dX
is needed, and every product uses the stored layouts, so nothing of size N besides X outlives the forward.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from .chains import Chain, Needs, Operands
from .dropout import DropoutMask, draw_seed

__all__ = ["CallSpec", "lora_apply"]


@dataclass(frozen=True)
class CallSpec:
    """Everything about one call that is not a tensor.

    Attributes:
        fwd: forward chain.
        bwd: backward chain (ignored when no gradient is needed).
        scaling: s = alpha / r (or alpha / sqrt(r) with rsLoRA).
        dropout: adapter-path dropout probability in [0, 1).
        conv1d: True when the base weight is stored (i, o) like transformers' Conv1D, False for (o, i).
        base_dtype: dtype of the base products (the weight's dtype, a quantized layer's compute dtype, or the
            autocast dtype).
        adapter_dtype: dtype of the adapter products (the adapter parameters' dtype, or the autocast dtype).
        dequantize: for quantized bases, a zero-arg callable returning the (o, i) weight in ``base_dtype``.
    """

    fwd: Chain
    bwd: Chain
    scaling: float
    dropout: float = 0.0
    conv1d: bool = False
    base_dtype: torch.dtype = torch.float32
    adapter_dtype: torch.dtype = torch.float32
    dequantize: Callable[[], torch.Tensor] | None = None


def _weight_source(spec: CallSpec, weight: torch.Tensor | None) -> torch.Tensor | Callable[[], torch.Tensor]:
    """(o, i) view of the base weight in the base dtype, or the dequantizer (called lazily, at most once)."""
    if weight is None:
        assert spec.dequantize is not None
        return spec.dequantize
    wt = weight.t() if spec.conv1d else weight
    return wt if wt.dtype == spec.base_dtype else wt.to(spec.base_dtype)


def _operands(spec, x2, weight, a, b, bias, mask: DropoutMask | None) -> Operands:
    s = spec.scaling if mask is None else spec.scaling * mask.keep_scale
    return Operands(
        x=x2,
        weight=_weight_source(spec, weight),
        a=a.to(spec.adapter_dtype),
        b=b.to(spec.adapter_dtype),
        s=s,
        bias=None if bias is None else bias.to(spec.base_dtype),
        mask=mask,
    )


class _RunLoRAFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, a, b, weight, bias, spec: CallSpec):
        in_features = x.shape[-1]
        x2 = x.reshape(-1, in_features).to(spec.base_dtype)  # (N, i)
        mask = DropoutMask(spec.dropout, draw_seed()) if spec.dropout > 0 else None
        with torch.autocast(x.device.type, enabled=False):
            y = spec.fwd.fn(_operands(spec, x2, weight, a, b, bias, mask))  # (N, o)
        needs = Needs(*ctx.needs_input_grad[:3])
        ctx.spec, ctx.mask, ctx.x_meta = spec, mask, (x.shape, x.dtype)
        ctx.bias_meta = None if bias is None else bias.dtype
        # X only when an adapter gradient needs it; parameters are saved for autograd's version checks.
        ctx.save_for_backward(x if needs.adapter else None, a, b, weight)
        return y.reshape(*x.shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, dy):
        x, a, b, weight = ctx.saved_tensors
        spec: CallSpec = ctx.spec
        needs = Needs(*ctx.needs_input_grad[:3])
        x_shape, x_dtype = ctx.x_meta
        dy2 = dy.reshape(-1, dy.shape[-1]).to(spec.base_dtype)  # (N, o)
        x2 = None if x is None else x.reshape(-1, x.shape[-1]).to(spec.base_dtype)  # (N, i)
        with torch.autocast(dy.device.type, enabled=False):
            ops = _operands(spec, x2, weight, a, b, None, ctx.mask)
            dx, da, db = spec.bwd.fn(ops, dy2, needs)
        dx = None if dx is None else dx.reshape(x_shape).to(x_dtype)
        da = None if da is None else da.to(a.dtype)
        db = None if db is None else db.to(b.dtype)
        dbias = dy2.sum(0).to(ctx.bias_meta) if ctx.needs_input_grad[4] else None
        return dx, da, db, None, dbias, None


def lora_apply(
    x: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    spec: CallSpec,
) -> torch.Tensor:
    """Y = X·W + s·(D(X)·A)·B (+ bias) with the chain pair in ``spec``.

    Args:
        x: (..., i) input; any leading dims, any strides.
        lora_a: (r, i) ``lora_A.weight``.
        lora_b: (o, r) ``lora_B.weight``.
        weight: base weight, (o, i) for ``nn.Linear`` or (i, o) for Conv1D (``spec.conv1d``); None for a
            quantized base, whose weight comes from ``spec.dequantize``.
        bias: (o,) base bias or None.
        spec: chains, scaling, dropout and dtypes.

    Returns:
        (..., o) output in ``spec.base_dtype``.
    """
    return _RunLoRAFunction.apply(x, lora_a, lora_b, weight, bias, spec)
