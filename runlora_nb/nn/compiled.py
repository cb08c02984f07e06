"""The RunLoRA call as one ``torch.library`` custom op, so ``torch.compile`` sees a single opaque node.

Eager calls go through :func:`runlora_nb.core.function.lora_apply` (an ``autograd.Function``). Under
``torch.compile`` that path is traced op by op and breaks the graph where Python does things Dynamo cannot follow
(the planner's cache, the dropout seed's ``.item()``, numba's dispatcher). :func:`lora_linear` is what a layer
calls instead while Dynamo traces: one custom op ``runlora_nb::lora_linear`` with a fake (meta) implementation
for shapes and a registered autograd formula whose backward is a second op, ``runlora_nb::lora_linear_backward``.
Inside the ops everything runs eagerly, exactly as in the eager path: the planner picks the chain pair from the real
shapes (cached per shape), the dropout seed is drawn from torch's default generator and returned as a 0-d int64
tensor — so backward rebuilds the very same mask — and only X (plus that 8-byte seed) is kept for backward.

Float bases only: a bitsandbytes-quantized base carries a dequantizing closure that an op schema cannot hold, so
quantized layers keep the ``autograd.Function`` path (with graph breaks) under ``torch.compile``.
"""

from __future__ import annotations

import torch

from ..core.chains import BACKWARD, FORWARD, Needs
from ..core.dropout import DropoutMask, draw_seed
from ..planning.planner import plan_chains

__all__ = ["lora_linear", "resolve_pair"]

_OP = "runlora_nb::lora_linear"


def resolve_pair(
    chain: str, n: int, i: int, o: int, r: int, needs: Needs, base_dtype, adapter_dtype, device, p: float
) -> tuple[str, str]:
    """(fwd, bwd) chain names for ``chain``: a planner mode (``"auto"``, ``"flops"``, ``"timed"``) planned for
    these shapes, or an explicit ``"fwd1,bwd5"``."""
    if "," in chain:
        f, b = chain.split(",")
        return f, b
    plan = plan_chains(
        n,
        i,
        o,
        r,
        needs=needs,
        dtype=base_dtype,
        adapter_dtype=adapter_dtype,
        device=device,
        dropout=p,
        mode=chain,
    )
    return plan.fwd, plan.bwd


def _weight_oi(weight: torch.Tensor, conv1d: bool, base_dtype: torch.dtype) -> torch.Tensor:
    wt = weight.t() if conv1d else weight  # (o, i)
    return wt if wt.dtype == base_dtype else wt.to(base_dtype)


def _operands(x2, weight, a, b, bias, s, mask, conv1d, base_dtype, adapter_dtype):
    from ..core.chains import Operands

    return Operands(
        x=x2,
        weight=_weight_oi(weight, conv1d, base_dtype),
        a=a.to(adapter_dtype),
        b=b.to(adapter_dtype),
        s=s if mask is None else s * mask.keep_scale,
        bias=None if bias is None else bias.to(base_dtype),
        mask=mask,
    )


def _out_features(weight: torch.Tensor, conv1d: bool) -> int:
    return weight.shape[1] if conv1d else weight.shape[0]


@torch.library.custom_op(_OP, mutates_args=())
def _lora_linear(
    x: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    chain: str,
    scaling: float,
    dropout: float,
    conv1d: bool,
    base_dtype: torch.dtype,
    adapter_dtype: torch.dtype,
    needs_dx: bool,
    needs_da: bool,
    needs_db: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Y = X·W + s·(D(X)·A)·B (+ bias) and the dropout seed (0-d int64; -1 without dropout)."""
    i = x.shape[-1]
    x2 = x.reshape(-1, i).to(base_dtype)  # (N, i)
    needs = Needs(needs_dx, needs_da, needs_db)
    f, _ = resolve_pair(chain, x2.shape[0], i, _out_features(weight, conv1d), a.shape[0], needs,
                        base_dtype, adapter_dtype, x.device, dropout)  # fmt: skip
    seed = draw_seed() if dropout > 0 else -1
    mask = DropoutMask(dropout, seed) if dropout > 0 else None
    ops = _operands(x2, weight, a, b, bias, scaling, mask, conv1d, base_dtype, adapter_dtype)
    with torch.autocast(x.device.type, enabled=False):
        y = FORWARD[f].fn(ops)  # (N, o)
    y = y.reshape(*x.shape[:-1], y.shape[-1]).contiguous()
    return y, torch.tensor(seed, dtype=torch.int64)


@_lora_linear.register_fake
def _(
    x,
    a,
    b,
    weight,
    bias,
    chain,
    scaling,
    dropout,
    conv1d,
    base_dtype,
    adapter_dtype,
    needs_dx,
    needs_da,
    needs_db,
):
    o = _out_features(weight, conv1d)
    return x.new_empty((*x.shape[:-1], o), dtype=base_dtype), torch.empty((), dtype=torch.int64)


@torch.library.custom_op(_OP + "_backward", mutates_args=())
def _lora_linear_backward(
    dy: torch.Tensor,
    x: torch.Tensor | None,
    a: torch.Tensor,
    b: torch.Tensor,
    weight: torch.Tensor,
    seed: torch.Tensor,
    x_dtype: torch.dtype,
    chain: str,
    scaling: float,
    dropout: float,
    conv1d: bool,
    base_dtype: torch.dtype,
    adapter_dtype: torch.dtype,
    needs_dx: bool,
    needs_da: bool,
    needs_db: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dX, dA, dB); a gradient that is not needed comes back as an empty tensor."""
    o = dy.shape[-1]
    dy2 = dy.reshape(-1, o).to(base_dtype)  # (N, o)
    i = a.shape[1]
    needs = Needs(needs_dx, needs_da, needs_db)
    _, bwd = resolve_pair(
        chain, dy2.shape[0], i, o, a.shape[0], needs, base_dtype, adapter_dtype, dy.device, dropout
    )
    mask = DropoutMask(dropout, int(seed.item())) if dropout > 0 else None
    x2 = None if x is None else x.reshape(-1, i).to(base_dtype)  # (N, i)
    ops = _operands(x2, weight, a, b, None, scaling, mask, conv1d, base_dtype, adapter_dtype)
    with torch.autocast(dy.device.type, enabled=False):
        dx, da, db = BACKWARD[bwd].fn(ops, dy2, needs)
    # contiguous, as the fake kernel promises (a chain may hand back a transposed view, e.g. dB = (dYᵀ·XA)ᵀ)
    dx = dy.new_empty(0) if dx is None else dx.reshape(*dy.shape[:-1], i).to(x_dtype).contiguous()
    da = dy.new_empty(0) if da is None else da.to(a.dtype).contiguous()
    db = dy.new_empty(0) if db is None else db.to(b.dtype).contiguous()
    return dx, da, db


@_lora_linear_backward.register_fake
def _(
    dy,
    x,
    a,
    b,
    weight,
    seed,
    x_dtype,
    chain,
    scaling,
    dropout,
    conv1d,
    base_dtype,
    adapter_dtype,
    ndx,
    nda,
    ndb,
):
    dx = dy.new_empty((*dy.shape[:-1], a.shape[1]), dtype=x_dtype) if ndx else dy.new_empty(0)
    da = a.new_empty(a.shape) if nda else dy.new_empty(0)
    return dx, da, b.new_empty(b.shape) if ndb else dy.new_empty(0)


_STATIC = (
    "chain",
    "scaling",
    "dropout",
    "conv1d",
    "base_dtype",
    "adapter_dtype",
    "needs_dx",
    "needs_da",
    "needs_db",
)


def _setup_context(ctx, inputs, output) -> None:
    x, a, b, weight, bias, *static = inputs
    ctx.static = static
    ctx.x_dtype = x.dtype
    ctx.has_bias = bias is not None
    ctx.bias_dtype = None if bias is None else bias.dtype
    adapter = static[7] or static[8]  # needs_da or needs_db: only then is X kept
    ctx.save_for_backward(x if adapter else None, a, b, weight, output[1])


def _backward(ctx, dy, _dseed):
    x, a, b, weight, seed = ctx.saved_tensors
    dx, da, db = _lora_linear_backward(dy, x, a, b, weight, seed, ctx.x_dtype, *ctx.static)
    needs_dx, needs_da, needs_db = ctx.static[6:]
    dbias = None
    if ctx.has_bias and ctx.needs_input_grad[4]:
        dbias = dy.reshape(-1, dy.shape[-1]).sum(0).to(ctx.bias_dtype)
    return (dx if needs_dx else None, da if needs_da else None, db if needs_db else None, None, dbias,
            *([None] * len(_STATIC)))  # fmt: skip


_lora_linear.register_autograd(_backward, setup_context=_setup_context)


def lora_linear(
    x: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    *,
    chain: str | tuple[str, str],
    scaling: float,
    dropout: float,
    conv1d: bool,
    base_dtype: torch.dtype,
    adapter_dtype: torch.dtype,
    needs: Needs,
) -> torch.Tensor:
    """Y = X·W + s·(D(X)·A)·B (+ bias) as the custom op ``runlora_nb::lora_linear`` (for ``torch.compile``).

    Args:
        x: (..., i) input.
        a: (r, i) ``lora_A.weight``.
        b: (o, r) ``lora_B.weight``.
        weight: float base weight, (o, i), or (i, o) when ``conv1d``.
        bias: (o,) or None.
        chain: planner mode or an explicit (fwd, bwd) pair.
        scaling: s.
        dropout: adapter-path dropout probability (0 in eval).
        conv1d: the weight is stored (i, o).
        base_dtype: dtype of the base products.
        adapter_dtype: dtype of the adapter products.
        needs: which of (dX, dA, dB) backward produces.

    Returns:
        (..., o) output in ``base_dtype``.
    """
    pair = chain if isinstance(chain, str) else ",".join(chain)
    y, _ = _lora_linear(
        x,
        a,
        b,
        weight,
        bias,
        pair,
        float(scaling),
        float(dropout),
        bool(conv1d),
        base_dtype,
        adapter_dtype,
        *needs,
    )
    return y
