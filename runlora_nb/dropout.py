"""Adapter-path dropout whose mask is regenerated, never stored.

RunLoRA applies dropout to the adapter input only, ``Y = XW + s·(D(X)A)B``, as PEFT does. PEFT keeps the dropped
copy of X (and the mask) alive for backward; here forward draws one 63-bit seed from torch's default generator
(so ``torch.manual_seed`` makes runs repeatable) and backward rebuilds the very same mask from that seed.

Mask bits come from a counter-free stream generator: on CPU numpy's SFC64 (about 4× faster than torch's
Mersenne Twister on this kind of machine), 16 random bits per element; on CUDA torch's Philox generator.
With 16-bit draws the drop probability is rounded to a multiple of 2⁻¹⁶ (|error| ≤ 7.7e-6) and the keep
scale is computed from the rounded value, so ``E[D(X)] = X`` holds exactly.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

__all__ = ["DropoutMask", "draw_seed", "keep_mask"]

_LEVELS = 1 << 16  # 16-bit draws


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
        """1 / P(keep) for the probability actually used (p rounded to a multiple of 2⁻¹⁶ on CPU)."""
        return _LEVELS / (_LEVELS - _threshold(self.p))

    def keep(self, shape: tuple[int, ...], device: torch.device) -> torch.Tensor:
        """Return the boolean keep mask of ``shape`` (True = element kept)."""
        return keep_mask(shape, self.p, self.seed, device)


def draw_seed() -> int:
    """Draw a mask seed from torch's default CPU generator (repeatable under ``torch.manual_seed``)."""
    return int(torch.randint(0, 2**63 - 1, (1,), dtype=torch.int64).item())


def _threshold(p: float) -> int:
    return min(_LEVELS - 1, round(p * _LEVELS))


def keep_mask(
    shape: tuple[int, ...], p: float, seed: int, device: torch.device | str = "cpu"
) -> torch.Tensor:
    """Boolean keep mask, a pure function of (shape, p, seed, device type).

    Args:
        shape: mask shape, e.g. ``(N, i)``.
        p: drop probability in [0, 1).
        seed: stream seed (see :func:`draw_seed`).
        device: where the mask lives. CPU masks come from numpy SFC64, CUDA masks from torch's Philox.

    Returns:
        A ``torch.bool`` tensor of ``shape``; each element is False with probability ≈ p.
    """
    device = torch.device(device)
    numel = int(np.prod(shape, dtype=np.int64)) if shape else 1
    if device.type == "cpu":
        words = (numel + 3) // 4  # four 16-bit draws per 64-bit word
        bits = np.random.SFC64(seed).random_raw(words).view(np.int16)[:numel]
        draws = torch.from_numpy(bits).view(shape)
        # int16 view of uniform uint16: value + 32768 is uniform in [0, 2^16)
        return draws >= (_threshold(p) - _LEVELS // 2)
    gen = torch.Generator(device=device)
    gen.manual_seed(seed)
    draws = torch.randint(0, _LEVELS, shape, generator=gen, device=device, dtype=torch.int32)
    return draws >= _threshold(p)
