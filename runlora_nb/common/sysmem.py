"""How much memory a device has free, and a check that refuses an allocation that cannot fit."""

from __future__ import annotations

import os

__all__ = ["available_bytes", "check_fits", "format_bytes", "pid_alive"]


def format_bytes(n: float) -> str:
    """``1536`` → ``"1.5 KiB"``; binary units up to TiB."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024:
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} TiB"


def available_bytes(device: str = "cpu") -> tuple[int, str] | None:
    """Free memory on ``device`` and where the number comes from, or None when it cannot be told.

    CPU: psutil's ``virtual_memory().available`` if psutil is installed, else ``MemAvailable`` of
    ``/proc/meminfo``. CUDA: ``torch.cuda.mem_get_info``.

    Args:
        device: ``"cpu"`` or a CUDA device string.

    Returns:
        ``(bytes, source)`` or None.
    """
    if str(device).startswith("cuda"):
        try:
            import torch

            free, _total = torch.cuda.mem_get_info(torch.device(device))
        except Exception:
            return None
        return int(free), "torch.cuda.mem_get_info"
    try:
        import psutil

        return int(psutil.virtual_memory().available), "psutil"
    except Exception:
        pass
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024, "/proc/meminfo MemAvailable"
    except (OSError, ValueError, IndexError):
        pass
    return None


def check_fits(needed: int, what: str, fix: str, device: str = "cpu", fraction: float = 0.9) -> None:
    """Refuse when ``needed`` bytes exceed ``fraction`` of the free memory of ``device``.

    Args:
        needed: estimated bytes.
        what: what would be allocated (starts the message).
        fix: what to change.
        device: where.
        fraction: share of the free memory one job may take.

    Raises:
        ValueError: it does not fit (the message names the size, the limit and ``fix``). Nothing is raised
            when the free memory cannot be told.
    """
    free = available_bytes(device)
    if free is None:
        return
    limit, source = free
    if needed > fraction * limit:
        raise ValueError(
            f"{what} needs about {format_bytes(needed)} of {device} memory, but only {format_bytes(limit)} is "
            f"available ({source}; the limit is {fraction:.0%} of it); {fix}"
        )


def pid_alive(pid: int) -> bool:
    """Whether a process with this id exists on this machine (one owned by another user counts as alive)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # exists, owned by someone else
        return True
    return True
