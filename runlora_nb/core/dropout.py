"""Adapter-path dropout whose mask is a pure function of (seed, element index): regenerated, never stored.

RunLoRA applies dropout to the adapter input only, ``Y = XW + s·(D(X)A)B``, as PEFT does. PEFT keeps the dropped
copy of X (and the mask) alive for backward; here forward draws one 63-bit seed from torch's default generator
(so ``torch.manual_seed`` makes runs repeatable) and backward recomputes the very same mask from it.

The mask of element j (row-major index in the flattened (N, i) input) is

    keep(j)  ⟺  splitmix64(seed + (j + 1)·φ) mod 2¹⁶  ≥  T,        T = round(p·2¹⁶)

a counter-based generator (splitmix64 passes BigCrush), so any element's bit can be computed independently.
Under data-parallel training every rank draws the same seed (``transformers.set_seed`` seeds them alike), so the
drawn seed is mixed with the distributed rank (:func:`distributed_rank`): ranks get different masks, rank 0 keeps
the undistributed seed, and a rerun with the same seeds is bit-identical.
On CPU one fused kernel (numba, compiled once and cached) streams X and writes D(X) in a single pass — no mask
tensor, no random-number buffer — about 5× faster than a chain of torch ops; elsewhere (CUDA, or without numba)
the same function runs as torch integer ops. Both give the same bits on every device.

The keep scale 1/(1 − T/2¹⁶) uses the rounded probability (|p − T/2¹⁶| ≤ 7.7e-6), so ``E[D(X)] = X`` holds
exactly; it is folded into the adapter product's alpha, so D(X) here only zeroes elements.
"""

from __future__ import annotations

import importlib.util
import itertools
import os
import tempfile
import threading
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch

__all__ = ["DropoutMask", "distributed_rank", "draw_seed", "fused_kernels_available", "keep_mask"]

_LEVELS = 1 << 16
_GOLDEN = 0x9E3779B97F4A7C15
_M1 = 0xBF58476D1CE4E5B9
_M2 = 0x94D049BB133111EB
_MASK64 = (1 << 64) - 1
_UINT_OF = {2: np.uint16, 4: np.uint32, 8: np.uint64}
_INT_OF = {2: torch.int16, 4: torch.int32, 8: torch.int64}
_PARALLEL_MIN = 1 << 18  # elements; below this one thread is faster than two
_lock = threading.Lock()
_kernels: tuple | None = None
_kernels_failed = False
_pool: ThreadPoolExecutor | None = None


def _reset_after_fork() -> None:
    """In a forked child the pool's threads do not exist (only the forking thread survives) and a lock may be
    held forever by a thread that is gone: start from a fresh lock and no pool (created again on first use)."""
    global _lock, _pool
    _lock = threading.Lock()
    _pool = None


if hasattr(os, "register_at_fork"):  # POSIX; notebook_launcher and multiprocessing "fork" copy this module
    os.register_at_fork(after_in_child=_reset_after_fork)


@dataclass(frozen=True)
class DropoutMask:
    """What backward needs to rebuild a mask: the probability and the seed (no tensors).

    Attributes:
        p: requested drop probability in [0, 1).
        seed: 63-bit seed of the mask.
    """

    p: float
    seed: int

    @property
    def threshold(self) -> int:
        """T: draws below it (of 2¹⁶) drop the element."""
        return _threshold(self.p)

    @property
    def keep_scale(self) -> float:
        """1 / P(keep) for the probability actually used (p rounded to a multiple of 2⁻¹⁶)."""
        return _LEVELS / (_LEVELS - self.threshold)

    def keep(self, shape: tuple[int, ...], device: torch.device | str = "cpu") -> torch.Tensor:
        """The boolean keep mask of ``shape`` (True = element kept)."""
        return keep_mask(shape, self.p, self.seed, device)

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """A new tensor equal to ``x`` with the dropped elements zeroed (no scaling). ``x`` is read as its
        row-major flattening, so the mask depends on its shape's element count only."""
        return _masked(x, self, inplace=False)

    def apply_(self, x: torch.Tensor) -> torch.Tensor:
        """Zero the dropped elements of ``x`` in place (``x`` must be contiguous); returns ``x``."""
        return _masked(x, self, inplace=True)


def distributed_rank() -> int:
    """This process's data-parallel rank: ``torch.distributed.get_rank()`` once a process group is initialized,
    else the ``RANK`` then ``LOCAL_RANK`` environment variable (torchrun and accelerate set them before the group
    exists), else 0.

    Raises:
        ValueError: ``RANK`` / ``LOCAL_RANK`` is set but is not a non-negative integer.
    """
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        return int(dist.get_rank())
    for name in ("RANK", "LOCAL_RANK"):
        value = os.environ.get(name, "").strip()
        if value:
            if not value.isdigit():
                raise ValueError(
                    f"runlora_nb.core.dropout: environment variable {name}={value!r} is not a non-negative "
                    f"integer rank; unset it or set it to this process's rank (0, 1, ...)"
                )
            return int(value)
    return 0


def mix_rank(seed: int, rank: int) -> int:
    """The 63-bit mask seed of ``rank`` from the seed every rank drew: ``seed`` itself on rank 0, else a splitmix64
    finalisation of ``seed ^ rank·M`` (a bijection of the seed per rank, so ranks' mask streams do not overlap
    by a shift as ``seed + rank`` would)."""
    if rank == 0:
        return seed
    z = ((seed ^ ((rank * _M2) & _MASK64)) + _GOLDEN) & _MASK64
    z = ((z ^ (z >> 30)) * _M1) & _MASK64
    z = ((z ^ (z >> 27)) * _M2) & _MASK64
    return (z ^ (z >> 31)) & (2**63 - 1)


def draw_seed() -> int:
    """Draw a mask seed from torch's default CPU generator (repeatable under ``torch.manual_seed``), mixed with
    :func:`distributed_rank` so data-parallel ranks drop different elements."""
    seed = int(torch.randint(0, 2**63 - 1, (1,), dtype=torch.int64).item())
    return mix_rank(seed, distributed_rank())


def _threshold(p: float) -> int:
    return min(_LEVELS - 1, round(p * _LEVELS))


def _signed(c: int) -> int:
    return c - (1 << 64) if c >= 1 << 63 else c


def _draws_torch(numel: int, seed: int, device: torch.device) -> torch.Tensor:
    """(numel,) int64 low 16 bits of splitmix64(seed + (j + 1)·φ), with torch integer ops (wrapping int64)."""

    def lsr(z: torch.Tensor, k: int) -> torch.Tensor:  # logical shift right on int64
        return torch.bitwise_right_shift(z, k).bitwise_and_((1 << (64 - k)) - 1)

    z = torch.arange(1, numel + 1, dtype=torch.int64, device=device)
    z.mul_(_signed(_GOLDEN)).add_(_signed(seed % (1 << 64)))
    z = z.bitwise_xor_(lsr(z, 30)).mul_(_signed(_M1))
    z = z.bitwise_xor_(lsr(z, 27)).mul_(_signed(_M2))
    z = z.bitwise_xor_(lsr(z, 31))
    return z.bitwise_and_(_LEVELS - 1)


def keep_mask(
    shape: tuple[int, ...], p: float, seed: int, device: torch.device | str = "cpu"
) -> torch.Tensor:
    """Boolean keep mask of ``shape``, a pure function of (shape, p, seed) — the same on every device."""
    numel = int(np.prod(shape, dtype=np.int64)) if shape else 1
    return (_draws_torch(numel, seed, torch.device(device)) >= _threshold(p)).view(shape)


# ------------------------------------------------------------------------------------------------ fused kernels


def _compile():
    """Compile (or load from numba's cache) the two fused CPU kernels; raises if numba is unavailable.

    Each kernel walks a whole 1-D view from index 0 (the form LLVM vectorises; AVX-512 here) and adds
    ``offset`` to get the global element index, so the work can be split between threads.
    """
    os.environ.setdefault("NUMBA_CACHE_DIR", os.fspath(_numba_cache()))
    from numba import njit, uint64

    golden, m1, m2, low16 = uint64(_GOLDEN), uint64(_M1), uint64(_M2), uint64(_LEVELS - 1)
    s30, s27, s31 = uint64(30), uint64(27), uint64(31)

    @njit(nogil=True, cache=True, fastmath=True, boundscheck=False)
    def masked_copy(src, dst, offset, seed, threshold):
        zero = src.dtype.type(0)
        for j in range(src.shape[0]):
            z = seed + (uint64(j) + offset) * golden  # splitmix64 of element offset + j
            z = (z ^ (z >> s30)) * m1
            z = (z ^ (z >> s27)) * m2
            z = z ^ (z >> s31)
            dst[j] = src[j] if (z & low16) >= threshold else zero

    @njit(nogil=True, cache=True, fastmath=True, boundscheck=False)
    def mask_inplace(buf, offset, seed, threshold):
        zero = buf.dtype.type(0)
        for j in range(buf.shape[0]):
            z = seed + (uint64(j) + offset) * golden
            z = (z ^ (z >> s30)) * m1
            z = (z ^ (z >> s27)) * m2
            z = z ^ (z >> s31)
            buf[j] = buf[j] if (z & low16) >= threshold else zero

    return masked_copy, mask_inplace


def _numba_cache():
    """numba's cache folder under the runlora_nb cache, or a private temporary folder when that one cannot be
    written (a read-only cache): the kernels still work, they are only compiled again in each process."""
    from ..common.paths import cache_dir

    try:
        path = cache_dir("numba")
        if os.access(path, os.W_OK):
            return path
    except OSError:
        pass
    return tempfile.mkdtemp(prefix="runlora-numba-")


def _unavailable_message(err: Exception) -> str:
    """The warning when the fused kernels cannot be built: the remedy depends on whether numba is installed."""
    what = f"fused dropout kernels unavailable ({type(err).__name__}: {err}); using torch ops (same masks, slower)."
    if importlib.util.find_spec("numba") is None:
        return f"runlora_nb: {what} `pip install numba` restores them."
    return (
        f"runlora_nb: {what} numba is installed, so it failed to compile or cache them: check that "
        f"NUMBA_CACHE_DIR ({os.environ.get('NUMBA_CACHE_DIR', 'unset')}) is writable, or point RUNLORA_NB_CACHE at a "
        "writable folder."
    )


def _get_kernels():
    global _kernels, _kernels_failed
    if _kernels is None and not _kernels_failed:
        with _lock:
            if _kernels is None and not _kernels_failed:
                try:
                    _kernels = _compile()
                except Exception as err:  # numba missing or broken: the torch path gives the same masks
                    _kernels_failed = True
                    warnings.warn(_unavailable_message(err), RuntimeWarning, stacklevel=3)
    return _kernels


def fused_kernels_available() -> bool:
    """True when the fused CPU kernels are compiled (they are used for CPU tensors of 2-, 4- or 8-byte dtypes)."""
    return _get_kernels() is not None


def _mask_threads(numel: int) -> int:
    """How many nogil threads build a mask of ``numel`` elements: torch's intra-op thread count (what the GEMMs
    around it use), at most one per ``_PARALLEL_MIN`` elements, at least one."""
    return max(1, min(torch.get_num_threads(), numel // _PARALLEL_MIN))


def _run_split(fn, arrays: tuple[np.ndarray, ...], seed: np.uint64, threshold: np.uint64) -> None:
    """``fn(*arrays, offset, seed, threshold)`` over the 1-D ``arrays``, split across :func:`_mask_threads`
    nogil threads (contiguous chunks; the counter-based draws make the result independent of the split).

    Draw index j + 1 belongs to element j, hence the offsets start at 1.
    """
    global _pool
    numel = arrays[0].shape[0]
    parts = _mask_threads(numel)
    if parts == 1:
        fn(*arrays, np.uint64(1), seed, threshold)
        return
    with _lock:
        if _pool is None or _pool._max_workers < parts:
            old, _pool = _pool, ThreadPoolExecutor(max_workers=parts, thread_name_prefix="runlora-mask")
            if old is not None:
                old.shutdown(wait=False)
        pool = _pool
    bounds = [numel * k // parts for k in range(parts + 1)]
    chunks = [(tuple(a[lo:hi] for a in arrays), np.uint64(lo + 1)) for lo, hi in itertools.pairwise(bounds)]
    list(pool.map(lambda c: fn(*c[0], c[1], seed, threshold), chunks))


def _masked(x: torch.Tensor, mask: DropoutMask, inplace: bool) -> torch.Tensor:
    kernels = _get_kernels() if x.device.type == "cpu" and x.element_size() in _UINT_OF else None
    if kernels is None:
        keep = keep_mask(tuple(x.shape), mask.p, mask.seed, x.device)
        return x.mul_(keep) if inplace else x * keep.to(x.dtype)
    masked_copy, mask_inplace = kernels
    size = x.element_size()

    def as_uint(t: torch.Tensor) -> np.ndarray:  # raw element bits (numpy has no bfloat16)
        return t.view(-1).view(_INT_OF[size]).numpy().view(_UINT_OF[size])

    seed, threshold = np.uint64(mask.seed % (1 << 64)), np.uint64(mask.threshold)
    if inplace:
        if not x.is_contiguous():
            raise ValueError("DropoutMask.apply_: the tensor must be contiguous")
        _run_split(mask_inplace, (as_uint(x.detach()),), seed, threshold)
        return x
    src = x.detach().contiguous()
    out = torch.empty_like(src)
    _run_split(masked_copy, (as_uint(src), as_uint(out)), seed, threshold)
    return out
