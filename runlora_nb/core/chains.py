"""The chain table: equivalent orders of matrix products for a LoRA linear layer.

Notation (arXiv 2312.03415): N tokens, i = in_features, o = out_features, r = rank, s = alpha / r.
In math ``Y = XW + s(XA)B`` with W (i, o), A (i, r), B (r, o). Tensors are stored the PEFT / ``nn.Linear`` way:
``wt`` is Wᵀ (o, i), ``a`` is Aᵀ (r, i) (``lora_A.weight``), ``b`` is Bᵀ (o, r) (``lora_B.weight``). Every
product below is written on those stored layouts, so no weight is ever copied or transposed in memory.

Each chain is data: a small function, its formula, and the list of GEMM shapes it performs for the gradients
that are needed. FLOPs, bytes moved and the planner's cost model are all derived from that one list, and a test
checks it against ``torch.utils.flop_counter`` on the real function.

Dropout acts on the adapter path only (``D(X)`` replaces X in every adapter product). Merged chains fold the
adapter into the base weight (``W + sAB``), which cannot express a mask on the adapter path: they are invalid
with dropout.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Literal

import torch

from .chain_operands import ALL, Gemm, Needs, Operands

__all__ = [
    "BACKWARD",
    "FORWARD",
    "Chain",
    "Gemm",
    "Needs",
    "Operands",
    "pair_flops",
    "pair_temp_bytes",
    "valid_pairs",
]


# --------------------------------------------------------------------------------------------------------------
# small shared pieces


def _base(op: Operands, wt: torch.Tensor) -> torch.Tensor:
    """(N, o) = X·W (+ bias) for a given (o, i) weight."""
    if op.bias is None:
        return op.x @ wt.t()
    return torch.addmm(op.bias, op.x, wt.t())


def _add_adapter(y: torch.Tensor, xa: torch.Tensor, op: Operands) -> torch.Tensor:
    """y += s·(XA)B, summed in the adapter dtype and returned in y's dtype (PEFT's numerics)."""
    if y.dtype == xa.dtype:
        return y.addmm_(xa, op.b.t(), alpha=op.s)
    return y.to(xa.dtype).addmm_(xa, op.b.t(), alpha=op.s).to(y.dtype)


def _t(op: Operands, dy_a: torch.Tensor) -> torch.Tensor:
    """(N, r) T = s·dY·Bᵀ in the adapter dtype (s folded here once, for dA and dX alike)."""
    return (dy_a @ op.b).mul_(op.s)


def _db_from_xa(op: Operands, dy_a: torch.Tensor) -> torch.Tensor:
    """(o, r) dB = s·dYᵀ·(XA) with XA recomputed, formed as (XAᵀ·dY)ᵀ: skinny kernels stream dY several times
    faster when the small operand is the transposed one (measured: 0.65 vs 2.0 ms at N=4096, o=768, r=8)."""
    xa = op.xd @ op.a.t()  # (N, r)
    return (xa.t() @ dy_a).mul_(op.s).t()


def _g_t(op: Operands, dy_a: torch.Tensor) -> torch.Tensor:
    """(o, i) Gᵀ = dYᵀ·D(X), the full-size gradient product of the 'G' chains, in the adapter dtype."""
    return dy_a.t() @ op.xd


Grads = tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]


# --------------------------------------------------------------------------------------------------------------
# forward chains


def fwd1(op: Operands) -> torch.Tensor:
    """Y = XW + s(XA)B: base GEMM, then the adapter added into its result by one addmm."""
    y = _base(op, op.wt)  # (N, o)
    xa = op.xd @ op.a.t()  # (N, r)
    return _add_adapter(y, xa, op)


def fwd2(op: Operands) -> torch.Tensor:
    """Y = X(W + sAB): merge the adapter into an (i, o) temporary, then one GEMM."""
    return _base(op, op.merged_weight())


def fwd3(op: Operands) -> torch.Tensor:
    """Y = XW + s(XA)B with the rank-r path in the base dtype, for adapters wider than the base.

    fwd1 casts X (N, i) to the adapter dtype, and Y (N, o) there and back, to add an fp32 adapter term to a bf16
    Y. Here A and B are rounded to the base dtype instead (r×i and o×r elements, not N×i), and the products
    accumulate in fp32 inside the bf16 kernels; the adapter term carries three more roundings of its own size,
    below Y's own rounding whenever it is smaller than Y. Gradients are untouched: backward chains still form
    dA and dB in the adapter dtype. With equal dtypes this is fwd1.
    """
    y = _base(op, op.wt)  # (N, o) in the base dtype
    dt = y.dtype
    xd = op.x if op.mask is None else op.mask.apply(op.x)  # (N, i) D(X), never cast
    xa = xd @ op.a.to(dt).t()  # (N, r)
    return y.addmm_(xa, op.b.to(dt).t(), alpha=op.s)


def _fwd1_gemms(N: int, i: int, o: int, r: int) -> list[Gemm]:
    return [Gemm(N, i, o), Gemm(N, i, r), Gemm(N, r, o, accumulate=True)]


def _fwd3_gemms(N: int, i: int, o: int, r: int) -> list[Gemm]:
    return [Gemm(N, i, o), Gemm(N, i, r, in_base=True), Gemm(N, r, o, accumulate=True, in_base=True)]


def _fwd2_gemms(N: int, i: int, o: int, r: int) -> list[Gemm]:
    return [Gemm(o, r, i, accumulate=True), Gemm(N, i, o)]


# --------------------------------------------------------------------------------------------------------------
# backward chains: each returns (dX (N, i) | None, dA (r, i) | None, dB (o, r) | None)


def _dx_plain(op: Operands, dy: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """dX = dY·Wᵀ + s·T·Aᵀ, the adapter term masked like the forward input was (T already holds s)."""
    if op.mask is None:
        dx = dy @ op.wt  # (N, i)
        if dx.dtype == t.dtype:
            return dx.addmm_(t, op.a)
        return dx.add_((t @ op.a).to(dx.dtype))
    ta = op.mask.apply_(t @ op.a)  # (N, i) masked adapter term
    if ta.dtype == dy.dtype:
        return ta.addmm_(dy, op.wt)  # the base product accumulates into it: one pass fewer
    return (dy @ op.wt).add_(ta.to(dy.dtype))


def _dx_in_base(op: Operands, dy: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """dX = dY·Wᵀ + s·T·Aᵀ with the adapter term in the base dtype: T (N, r) and A rounded to it, accumulated into
    dX by one addmm instead of an adapter-dtype (N, i) temporary that is cast down and added."""
    dt = dy.dtype
    t_b, a_b = t.to(dt), op.a.to(dt)  # (N, r), (r, i)
    if op.mask is None:
        return (dy @ op.wt).addmm_(t_b, a_b)
    return op.mask.apply_(t_b @ a_b).addmm_(
        dy, op.wt
    )  # masked adapter term, base product accumulated into it


def _dx_merged(op: Operands, dy: torch.Tensor) -> torch.Tensor:
    """dX = dY·(W + sAB)ᵀ."""
    return dy @ op.merged_weight()


def bwd1(op: Operands, dy: torch.Tensor, needs: Needs) -> Grads:
    """dA = s·XᵀT, dB = s·(XA)ᵀdY with XA recomputed, dX = dY·Wᵀ + s·T·Aᵀ."""
    dy_a = dy.to(op.a.dtype)
    t = _t(op, dy_a) if (needs.da or needs.dx) else None
    da = t.t() @ op.xd if needs.da else None
    db = _db_from_xa(op, dy_a) if needs.db else None
    dx = _dx_plain(op, dy, t) if needs.dx else None
    return dx, da, db


def bwd2(op: Operands, dy: torch.Tensor, needs: Needs) -> Grads:
    """dA = s·XᵀT, dB = s·Aᵀ(XᵀdY), dX = dY·Wᵀ + s·T·Aᵀ."""
    dy_a = dy.to(op.a.dtype)
    t = _t(op, dy_a) if (needs.da or needs.dx) else None
    da = t.t() @ op.xd if needs.da else None
    db = (_g_t(op, dy_a) @ op.a.t()).mul_(op.s) if needs.db else None
    dx = _dx_plain(op, dy, t) if needs.dx else None
    return dx, da, db


def bwd6(op: Operands, dy: torch.Tensor, needs: Needs) -> Grads:
    """bwd1 with dX's adapter term in the base dtype (for adapters wider than the base; dA, dB unchanged)."""
    dy_a = dy.to(op.a.dtype)
    t = _t(op, dy_a) if (needs.da or needs.dx) else None
    da = t.t() @ op.xd if needs.da else None
    db = _db_from_xa(op, dy_a) if needs.db else None
    dx = _dx_in_base(op, dy, t) if needs.dx else None
    return dx, da, db


def _grads_from_g(op: Operands, dy_a: torch.Tensor, needs: Needs) -> tuple[torch.Tensor | None, ...]:
    """dA = s·G·Bᵀ and dB = s·Aᵀ·G from one G = XᵀdY."""
    if not needs.adapter:
        return None, None
    g_t = _g_t(op, dy_a)  # (o, i)
    da = (op.b.t() @ g_t).mul_(op.s) if needs.da else None  # (r, i)
    db = (g_t @ op.a.t()).mul_(op.s) if needs.db else None  # (o, r)
    return da, db


def bwd3(op: Operands, dy: torch.Tensor, needs: Needs) -> Grads:
    """dA = s·G·Bᵀ, dB = s·Aᵀ·G with G = XᵀdY, dX = dY·Wᵀ + s·T·Aᵀ."""
    dy_a = dy.to(op.a.dtype)
    da, db = _grads_from_g(op, dy_a, needs)
    dx = _dx_plain(op, dy, _t(op, dy_a)) if needs.dx else None
    return dx, da, db


def bwd4(op: Operands, dy: torch.Tensor, needs: Needs) -> Grads:
    """dA = s·G·Bᵀ, dB = s·Aᵀ·G with G = XᵀdY, dX = dY·(W + sAB)ᵀ."""
    da, db = _grads_from_g(op, dy.to(op.a.dtype), needs)
    dx = _dx_merged(op, dy) if needs.dx else None
    return dx, da, db


def bwd5(op: Operands, dy: torch.Tensor, needs: Needs) -> Grads:
    """dA = s·XᵀT, dB = s·(XA)ᵀdY with XA recomputed, dX = dY·(W + sAB)ᵀ."""
    dy_a = dy.to(op.a.dtype)
    da = _t(op, dy_a).t() @ op.xd if needs.da else None
    db = _db_from_xa(op, dy_a) if needs.db else None
    dx = _dx_merged(op, dy) if needs.dx else None
    return dx, da, db


# GEMM lists, mirroring the functions above term by term.


def _t_gemm(N, i, o, r) -> Gemm:
    return Gemm(N, o, r)  # T = dY·Bᵀ


def _bwd1_gemms(N, i, o, r, needs: Needs) -> list[Gemm]:
    g = [_t_gemm(N, i, o, r)] if (needs.da or needs.dx) else []
    g += [Gemm(r, N, i, trans_a=True)] if needs.da else []
    g += [Gemm(N, i, r), Gemm(r, N, o, trans_a=True)] if needs.db else []
    g += [Gemm(N, o, i), Gemm(N, r, i, accumulate=True)] if needs.dx else []
    return g


def _bwd6_gemms(N, i, o, r, needs: Needs) -> list[Gemm]:
    g = [_t_gemm(N, i, o, r)] if (needs.da or needs.dx) else []
    g += [Gemm(r, N, i, trans_a=True)] if needs.da else []
    g += [Gemm(N, i, r), Gemm(r, N, o, trans_a=True)] if needs.db else []
    g += [Gemm(N, o, i), Gemm(N, r, i, accumulate=True, in_base=True)] if needs.dx else []
    return g


def _bwd2_gemms(N, i, o, r, needs: Needs) -> list[Gemm]:
    g = [_t_gemm(N, i, o, r)] if (needs.da or needs.dx) else []
    g += [Gemm(r, N, i, trans_a=True)] if needs.da else []
    g += [Gemm(o, N, i, trans_a=True), Gemm(o, i, r)] if needs.db else []
    g += [Gemm(N, o, i), Gemm(N, r, i, accumulate=True)] if needs.dx else []
    return g


def _g_gemms(N, i, o, r, needs: Needs) -> list[Gemm]:
    g = [Gemm(o, N, i, trans_a=True)] if needs.adapter else []
    g += [Gemm(r, o, i, trans_a=True)] if needs.da else []
    g += [Gemm(o, i, r)] if needs.db else []
    return g


def _bwd3_gemms(N, i, o, r, needs: Needs) -> list[Gemm]:
    dx = [_t_gemm(N, i, o, r), Gemm(N, o, i), Gemm(N, r, i, accumulate=True)] if needs.dx else []
    return _g_gemms(N, i, o, r, needs) + dx


def _merged_dx_gemms(N, i, o, r) -> list[Gemm]:
    return [Gemm(o, r, i, accumulate=True), Gemm(N, o, i)]


def _bwd4_gemms(N, i, o, r, needs: Needs) -> list[Gemm]:
    return _g_gemms(N, i, o, r, needs) + (_merged_dx_gemms(N, i, o, r) if needs.dx else [])


def _bwd5_gemms(N, i, o, r, needs: Needs) -> list[Gemm]:
    g = [_t_gemm(N, i, o, r), Gemm(r, N, i, trans_a=True)] if needs.da else []
    g += [Gemm(N, i, r), Gemm(r, N, o, trans_a=True)] if needs.db else []
    return g + (_merged_dx_gemms(N, i, o, r) if needs.dx else [])


# --------------------------------------------------------------------------------------------------------------
# the table


@dataclass(frozen=True)
class Chain:
    """One named order of products.

    Attributes:
        id: ``"fwd1"`` … ``"bwd5"``.
        kind: ``"fwd"`` or ``"bwd"``.
        formula: what it computes, in the paper's notation.
        fn: forward ``fn(op) -> Y`` or backward ``fn(op, dy, needs) -> (dX, dA, dB)``.
        merged: True if it builds ``W + sAB`` (invalid with dropout; rounds sAB to the base dtype).
        gemm_list: ``(N, i, o, r[, needs]) -> list[Gemm]``, the products it performs.
        temps: ``(N, i, o, r, needs) -> int``, elements of the temporaries it allocates (besides outputs).
        mixed_only: True for a chain that only differs from another when the adapters are wider than the base
            (fp32 adapters on a bf16 base): it runs the adapter products in the base dtype, without N-row casts.
    """

    id: str
    kind: Literal["fwd", "bwd"]
    formula: str
    fn: Callable
    merged: bool
    gemm_list: Callable[..., list[Gemm]]
    temps: Callable[[int, int, int, int, Needs], int]
    mixed_only: bool = False

    def gemms(self, N: int, i: int, o: int, r: int, needs: Needs = ALL) -> list[Gemm]:
        """The GEMMs this chain runs for ``needs`` (forward chains ignore ``needs``)."""
        if self.kind == "fwd":
            return self.gemm_list(N, i, o, r)
        return self.gemm_list(N, i, o, r, Needs(*needs))

    def flops(self, N: int, i: int, o: int, r: int, needs: Needs = ALL) -> int:
        """Matmul FLOPs (2·m·k·n per product) for the gradients in ``needs``."""
        return sum(g.flops for g in self.gemms(N, i, o, r, needs))

    def temp_bytes(self, N: int, i: int, o: int, r: int, needs: Needs = ALL, itemsize: int = 4) -> int:
        """Bytes of temporaries the chain allocates and frees within the call."""
        return self.temps(N, i, o, r, Needs(*needs)) * itemsize

    def valid_with_dropout(self) -> bool:
        return not self.merged

    def __repr__(self) -> str:  # keep tables and error messages short
        return f"Chain({self.id}: {self.formula})"


def _fwd_temps(merged: bool) -> Callable[..., int]:
    return lambda N, i, o, r, needs: i * o if merged else N * r


def _bwd_temps(t: bool, xa: bool, g: bool, merged: bool) -> Callable[..., int]:
    def temps(N, i, o, r, needs: Needs) -> int:
        n = N * r if (t and (needs.da or needs.dx)) else 0
        n += N * r if (xa and needs.db) else 0
        n += i * o if (g and needs.adapter) else 0
        n += i * o if (merged and needs.dx) else 0
        return n

    return temps


FORWARD: dict[str, Chain] = {
    c.id: c
    for c in (
        Chain("fwd1", "fwd", "Y = XW + s(XA)B", fwd1, False, _fwd1_gemms, _fwd_temps(False)),
        Chain("fwd2", "fwd", "Y = X(W + sAB)", fwd2, True, _fwd2_gemms, _fwd_temps(True)),
        Chain(
            "fwd3",
            "fwd",
            "Y = XW + s(XA)B, rank-r path in the base dtype",
            fwd3,
            False,
            _fwd3_gemms,
            _fwd_temps(False),
            mixed_only=True,
        ),
    )
}

BACKWARD: dict[str, Chain] = {
    c.id: c
    for c in (
        Chain(
            "bwd1",
            "bwd",
            "dA = s·XᵀT, dB = s·(XA)ᵀdY, dX = dY·Wᵀ + s·T·Aᵀ  (T = dY·Bᵀ)",
            bwd1,
            False,
            _bwd1_gemms,
            _bwd_temps(t=True, xa=True, g=False, merged=False),
        ),
        Chain(
            "bwd2",
            "bwd",
            "dA = s·XᵀT, dB = s·Aᵀ(XᵀdY), dX = dY·Wᵀ + s·T·Aᵀ",
            bwd2,
            False,
            _bwd2_gemms,
            _bwd_temps(t=True, xa=False, g=True, merged=False),
        ),
        Chain(
            "bwd3",
            "bwd",
            "dA = s·G·Bᵀ, dB = s·Aᵀ·G, dX = dY·Wᵀ + s·T·Aᵀ  (G = XᵀdY)",
            bwd3,
            False,
            _bwd3_gemms,
            _bwd_temps(t=True, xa=False, g=True, merged=False),
        ),
        Chain(
            "bwd4",
            "bwd",
            "dA = s·G·Bᵀ, dB = s·Aᵀ·G, dX = dY·(W + sAB)ᵀ",
            bwd4,
            True,
            _bwd4_gemms,
            _bwd_temps(t=False, xa=False, g=True, merged=True),
        ),
        Chain(
            "bwd5",
            "bwd",
            "dA = s·XᵀT, dB = s·(XA)ᵀdY, dX = dY·(W + sAB)ᵀ",
            bwd5,
            True,
            _bwd5_gemms,
            _bwd_temps(t=True, xa=True, g=False, merged=True),
        ),
        Chain(
            "bwd6",
            "bwd",
            "bwd1 with dX's adapter term s·T·Aᵀ in the base dtype",
            bwd6,
            False,
            _bwd6_gemms,
            _bwd_temps(t=True, xa=True, g=False, merged=False),
            mixed_only=True,
        ),
    )
}


def valid_pairs(
    dropout: float = 0.0, *, allow_merged: bool = True, mixed: bool = False
) -> Iterator[tuple[str, str]]:
    """Every (fwd id, bwd id) pair valid under the given conditions.

    Args:
        dropout: adapter dropout probability; any p > 0 rules out the merged chains.
        allow_merged: False also rules them out (e.g. fp32 adapters on a bf16 base, where ``W + sAB`` would
            round the adapter's contribution to bf16).
        mixed: True when the adapters are wider than the base dtype; only then are the ``mixed_only`` chains
            candidates (with equal dtypes they repeat another chain).

    Yields:
        ``(fwd_id, bwd_id)`` in table order.
    """
    merged_ok = allow_merged and dropout == 0.0
    for f in FORWARD.values():
        for b in BACKWARD.values():
            if (f.mixed_only or b.mixed_only) and not mixed:
                continue
            if merged_ok or not (f.merged or b.merged):
                yield f.id, b.id


def pair_flops(fwd: str, bwd: str, N: int, i: int, o: int, r: int, needs: Needs = ALL) -> int:
    """FLOPs of one forward + backward with the given pair (backward skipped when nothing is needed)."""
    total = FORWARD[fwd].flops(N, i, o, r)
    return total + (BACKWARD[bwd].flops(N, i, o, r, needs) if Needs(*needs).any else 0)


def pair_temp_bytes(
    fwd: str, bwd: str, N: int, i: int, o: int, r: int, needs: Needs = ALL, itemsize: int = 4
) -> int:
    """Peak temporary bytes of the pair: the larger of its forward and backward temporaries."""
    f = FORWARD[fwd].temp_bytes(N, i, o, r, needs, itemsize)
    b = BACKWARD[bwd].temp_bytes(N, i, o, r, needs, itemsize) if Needs(*needs).any else 0
    return max(f, b)
