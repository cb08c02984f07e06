"""Adapter-path dropout whose mask is regenerated, never stored.

RunLoRA applies dropout to the adapter input only, ``Y = XW + s·(D(X)A)B``, as PEFT does. PEFT keeps the dropped
copy of X (and the mask) alive for backward; here forward draws one 63-bit seed from torch's default generator
(so ``torch.manual_seed`` makes runs repeatable) and backward rebuilds the very same mask from that seed.

Each element gets a 16-bit uniform draw: on CPU from numpy's SFC64 streams (four draws per 64-bit word, about
4× faster than torch's Mersenne Twister here, two streams in parallel for large masks), on CUDA from torch's
Philox generator. The drop probability is rounded to a multiple of 2⁻¹⁶ (|error| ≤ 7.7e-6) and the keep scale
is computed from the rounded value, so ``E[D(X)] = X`` holds exactly.

The mask is applied as a bitwise AND with an integer tensor of the element width (all ones = keep, zero = drop):
``D(X) = X & bits`` with the keep scale folded into the adapter product's alpha. On CPU that is several times
faster than a multiply by a boolean tensor.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch

__all__ = ["DropoutMask", "apply_bits", "draw_seed", "keep_mask", "mask_bits"]

_LEVELS = 1 << 16  # 16-bit draws
_HALF = _LEVELS // 2
_PARALLEL_MIN = 1 << 20  # elements; below this one stream is faster than two threads
_pool: ThreadPoolExecutor | None = None
_INT_OF = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


@dataclass(frozen=True)
class DropoutMask:
    """What backward needs to rebuild a mask: the probability and the seed (no tensors).

    Attributes:
        p: requested drop probability in [0, 1).
        seed: 63-bit seed of the mask stream.
    """

    p: float
    seed: int

    @property
    def keep_scale(self) -> float:
        """1 / P(keep) for the probability actually used (p rounded to a multiple of 2⁻¹⁶)."""
        return _LEVELS / (_LEVELS - _threshold(self.p))

    def keep(self, shape: tuple[int, ...], device: torch.device | str) -> torch.Tensor:
        """The boolean keep mask of ``shape`` (True = element kept)."""
        return keep_mask(shape, self.p, self.seed, device)

    def bits(self, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device | str) -> torch.Tensor:
        """The same mask as integers of ``dtype``'s width: -1 (all bits set) = keep, 0 = drop."""
        return mask_bits(shape, self.p, self.seed, dtype, device)


def draw_seed() -> int:
    """Draw a mask seed from torch's default CPU generator (repeatable under ``torch.manual_seed``)."""
    return int(torch.randint(0, 2**63 - 1, (1,), dtype=torch.int64).item())


def _threshold(p: float) -> int:
    return min(_LEVELS - 1, round(p * _LEVELS))


def _cpu_draws(numel: int, seed: int) -> torch.Tensor:
    """(numel,) int16 uniform draws from SFC64 (two streams in parallel for large masks)."""
    global _pool
    words = (numel + 3) // 4  # four 16-bit draws per 64-bit word
    if numel < _PARALLEL_MIN:
        raw = np.random.SFC64(seed).random_raw(words)
    else:
        if _pool is None:
            _pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="runlora-mask")
        half = words // 2
        parts = list(
            _pool.map(
                lambda k: np.random.SFC64([seed, k]).random_raw(half if k == 0 else words - half), (0, 1)
            )
        )
        raw = np.concatenate(parts)
    return torch.from_numpy(raw.view(np.int16)[:numel])


def _draws(shape: tuple[int, ...], seed: int, device: torch.device) -> torch.Tensor:
    """int32 uniform draws in [-2¹⁵, 2¹⁵) of ``shape``, a pure function of (shape, seed, device type)."""
    numel = int(np.prod(shape, dtype=np.int64)) if shape else 1
    if device.type == "cpu":
        return _cpu_draws(numel, seed).view(shape).to(torch.int32)
    gen = torch.Generator(device=device)
    gen.manual_seed(seed)
    return torch.randint(-_HALF, _HALF, shape, generator=gen, device=device, dtype=torch.int32)


def mask_bits(
    shape: tuple[int, ...], p: float, seed: int, dtype: torch.dtype, device: torch.device | str = "cpu"
) -> torch.Tensor:
    """Integer keep mask of the element width of ``dtype``: -1 = keep, 0 = drop.

    Args:
        shape: mask shape, e.g. ``(N, i)``.
        p: drop probability in [0, 1).
        seed: stream seed (see :func:`draw_seed`).
        dtype: dtype of the tensors the mask will be applied to (fixes the integer width).
        device: where the mask lives.

    Returns:
        int8/16/32/64 tensor of ``shape``.
    """
    bits = _draws(shape, seed, torch.device(device))
    # keep iff draw ≥ t: (draw − t) ≥ 0, so its sign bit is 0; shift the sign across and invert
    bits.sub_(_threshold(p) - _HALF).bitwise_right_shift_(31).bitwise_not_()
    width = _INT_OF[dtype.itemsize]
    return bits if width == torch.int32 else bits.to(width)


def keep_mask(
    shape: tuple[int, ...], p: float, seed: int, device: torch.device | str = "cpu"
) -> torch.Tensor:
    """Boolean keep mask, a pure function of (shape, p, seed, device type); equal to ``mask_bits(...) != 0``."""
    return mask_bits(shape, p, seed, torch.int8, device) != 0


def apply_bits(x: torch.Tensor, bits: torch.Tensor, *, inplace: bool = False) -> torch.Tensor:
    """Zero the dropped elements of ``x`` (no scaling): ``x & bits`` on the raw element bits.

    Args:
        x: float tensor.
        bits: from :func:`mask_bits` with ``x.dtype``, same shape.
        inplace: modify ``x`` (it must not be a tensor the caller still needs).

    Returns:
        The masked tensor (``x`` itself when ``inplace``).
    """
    raw = x.view(bits.dtype)
    if inplace:
        raw.bitwise_and_(bits)
        return x
    return (raw & bits).view(x.dtype)
