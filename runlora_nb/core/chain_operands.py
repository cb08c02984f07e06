"""What every chain works on: which gradients are needed (:class:`Needs`), one matrix product as data
(:class:`Gemm`, from which FLOPs, bytes and the cost model's price derive) and the flattened inputs of one call
(:class:`Operands`, stored layouts; casts, dropout and a dequantized weight computed at most once).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import torch

from .dropout import DropoutMask

__all__ = ["ALL", "Gemm", "Needs", "Operands"]


class Needs(NamedTuple):
    """Which gradients backward must produce: dX, dA, dB."""

    dx: bool = True
    da: bool = True
    db: bool = True

    @property
    def adapter(self) -> bool:
        """True when any adapter gradient (dA or dB) is needed."""
        return self.da or self.db

    @property
    def any(self) -> bool:
        return self.dx or self.da or self.db

    def label(self) -> str:
        """Short text like ``"dX,dA,dB"`` or ``"none"``."""
        names = [n for n, on in zip(("dX", "dA", "dB"), self) if on]
        return ",".join(names) or "none"


ALL = Needs()


class Gemm(NamedTuple):
    """One matrix product (m, k) @ (k, n).

    ``accumulate`` marks an addmm into an existing (m, n) output; ``trans_a`` marks a first operand that is a
    transposed view (e.g. dYᵀ), which skinny kernels read at a different speed; ``in_base`` marks a rank-r
    product run in the base dtype although the adapters are wider (the ``mixed_only`` chains).
    """

    m: int
    k: int
    n: int
    accumulate: bool = False
    trans_a: bool = False
    in_base: bool = False

    @property
    def flops(self) -> int:
        return 2 * self.m * self.k * self.n


@dataclass
class Operands:
    """Inputs of one chain call, flattened and in stored layouts.

    Attributes:
        x: (N, i) input in the base compute dtype; None in a backward that needs only dX.
        weight: (o, i) base weight Wᵀ in the base compute dtype, or a zero-arg callable that returns it
            (quantized bases dequantize on demand and never keep the result).
        a: (r, i) ``lora_A.weight`` in the adapter dtype.
        b: (o, r) ``lora_B.weight`` in the adapter dtype.
        s: scaling, already multiplied by the dropout keep scale.
        bias: (o,) frozen bias in the base compute dtype, or None.
        mask: the dropout mask (seed and p; its bits are recomputed wherever they are needed), or None.
    """

    x: torch.Tensor | None
    weight: torch.Tensor | Callable[[], torch.Tensor]
    a: torch.Tensor
    b: torch.Tensor
    s: float
    bias: torch.Tensor | None = None
    mask: DropoutMask | None = None

    @functools.cached_property
    def wt(self) -> torch.Tensor:
        """(o, i) base weight; a dequantizing callable runs at most once per chain call."""
        return self.weight() if callable(self.weight) else self.weight

    @functools.cached_property
    def xd(self) -> torch.Tensor:
        """(N, i) adapter input D(X) in the adapter dtype (mask applied, scale folded into ``s``)."""
        x = self.x.to(self.a.dtype)
        if self.mask is None:
            return x
        if x is not self.x and x.is_contiguous():
            return self.mask.apply_(x)  # a fresh cast: mask it where it is
        return self.mask.apply(x)

    def merged_weight(self) -> torch.Tensor:
        """(o, i) Wᵀ + s·(AB)ᵀ in the base dtype: an i×o temporary, never kept."""
        wt = self.wt
        return torch.addmm(wt, self.b.to(wt.dtype), self.a.to(wt.dtype), alpha=self.s)
