"""How far a computed result may be from the exact one: rounding bounds from the dtype and reduction length.

Tests (and users comparing two runs) need a bound that means something, not a number that happened to pass.
:func:`rounding_bound` gives the normwise relative error ``‖ŷ − y‖ / ‖y‖`` that ``depth`` matrix products in
series may add, each reducing over at most ``k`` terms. See ``docs/numerics.md`` for the derivation and what it
says about two chain pairs.
"""

from __future__ import annotations

import math

import torch

__all__ = ["accumulate_dtype", "pair_difference_bound", "rounding_bound", "unit_roundoff"]

#: Safety factor on the probabilistic accumulation term (see :func:`rounding_bound`).
LAMBDA = 2.0


def unit_roundoff(dtype: torch.dtype) -> float:
    """u = eps / 2 of a floating dtype: the largest relative error of rounding one value to nearest.

    Raises:
        TypeError: ``dtype`` is not a floating dtype.
    """
    if not dtype.is_floating_point:
        raise TypeError(f"numerics.unit_roundoff: {dtype} is not a floating dtype; pass e.g. torch.float32")
    return torch.finfo(dtype).eps / 2


def accumulate_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype PyTorch's CPU and CUDA GEMMs accumulate in: float32 for 16-bit inputs, else the dtype itself."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def rounding_bound(
    dtype: torch.dtype,
    k: int,
    depth: int = 1,
    *,
    deterministic: bool = False,
    accumulate: torch.dtype | None = None,
) -> float:
    """Bound on the normwise relative rounding error of ``depth`` matrix products in series, reduction length k.

    Each product contributes two kinds of error:

    - **accumulation**: summing k products in the accumulator dtype (``u_acc``). The worst case is
      γ_k = k·u_acc / (1 − k·u_acc) relative to |A|·|B| (Higham, *Accuracy and Stability of Numerical
      Algorithms*, 2nd ed., §3.5). Rounding errors behave like independent zero-mean variables, so with high
      probability the error is λ·√k·u_acc instead (Higham & Mary, SIAM J. Sci. Comput. 41(5), 2019; their
      2020 paper shows the same √k growth relative to ‖A·B‖ for zero-mean data, as in LoRA layers). The
      default is that probabilistic form with λ = :data:`LAMBDA` = 2: the normwise error is the RMS of many
      element errors, which concentrates, and each rounding error has standard deviation u/√3, so λ = 2 is
      about 3.5 standard deviations above the mean.
    - **storage**: rounding the product (or a temporary such as X·A or W + sAB) to ``dtype``: at most u of
      ``dtype`` per element, hence normwise, deterministically.

    Errors of products in series add to first order, so the bound is ``depth · (λ√k·u_acc + u)`` (or
    ``depth · (γ_k + u)`` when ``deterministic``). It is relative to ‖y‖ when the result does not cancel; for a
    result of a few elements that may cancel, compare against the norm of the computation on absolute values.

    Args:
        dtype: storage dtype of the results and temporaries.
        k: the longest reduction (inner dimension) among the products, ≥ 1; for a LoRA layer
            ``max(N, i, o, r)`` covers Y, dX, dA and dB.
        depth: how many roundings of products lie in series on the path to the result, ≥ 1; a chain pair of
            :mod:`runlora_nb.core.chains` has at most 3 (e.g. (X·A)·B added to X·W).
        deterministic: use the worst-case γ_k instead of the probabilistic √k term (valid for any data, but
            relative to ‖|A|·|B|‖ rather than ‖A·B‖, and much looser).
        accumulate: accumulator dtype; default :func:`accumulate_dtype` of ``dtype``.

    Returns:
        The bound, a float in (0, ∞); ``inf`` when the deterministic k·u_acc ≥ 1.

    Raises:
        ValueError: k < 1 or depth < 1.
        TypeError: ``dtype`` is not a floating dtype.
    """
    if not (isinstance(k, int) and k >= 1) or not (isinstance(depth, int) and depth >= 1):
        raise ValueError(
            f"numerics.rounding_bound: k and depth must be integers >= 1, got k={k!r}, depth={depth!r}"
        )
    u = unit_roundoff(dtype)
    u_acc = unit_roundoff(accumulate or accumulate_dtype(dtype))
    if deterministic:
        ku = k * u_acc
        if ku >= 1:
            return math.inf
        acc = ku / (1 - ku)
    else:
        acc = LAMBDA * math.sqrt(k) * u_acc
    return depth * (acc + u)


def pair_difference_bound(dtype: torch.dtype, k: int, depth: int = 3) -> float:
    """How much two chain pairs' results may differ, relative to their norm: twice :func:`rounding_bound`.

    Each pair is within ``rounding_bound(dtype, k, depth)`` of the exact result, so by the triangle inequality
    two pairs are within twice that of each other.

    Args:
        dtype: storage dtype.
        k: longest reduction, e.g. ``max(N, in_features, out_features, r)``.
        depth: products in series (3 covers every chain pair).

    Returns:
        The bound on ``‖y₁ − y₂‖ / ‖y₂‖``.
    """
    return 2 * rounding_bound(dtype, k, depth)
