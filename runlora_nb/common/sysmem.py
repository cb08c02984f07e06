"""How much memory a device has free, and a check that refuses an allocation that cannot fit."""

from __future__ import annotations

import os

__all__ = [
    "available_bytes",
    "check_fits",
    "format_bytes",
    "peak_rss_bytes",
    "pid_alive",
    "reset_peak_rss",
    "rss_bytes",
]


def format_bytes(n: float) -> str:
    """``1536`` → ``"1.5 KiB"``; binary units up to TiB."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024:
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} TiB"


def rss_bytes() -> int | None:
    """The process's resident set size now (Linux ``/proc/self/statm``), None where it cannot be read."""
    try:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


def peak_rss_bytes() -> int:
    """The process's peak resident set size since it started or since :func:`reset_peak_rss` worked.

    Linux: ``VmHWM`` of ``/proc/self/status`` (which the reset moves back to the current RSS); elsewhere
    ``getrusage``'s ``ru_maxrss``, a high-water mark of the whole process that cannot be reset.
    """
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    import resource
    import sys

    scale = 1 if sys.platform == "darwin" else 1024  # macOS reports bytes, Linux KiB
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * scale


def reset_peak_rss() -> bool:
    """Move the process's peak RSS back to its current RSS, so the next :func:`peak_rss_bytes` is the peak of
    what runs from now on (one sweep trial, one measured step) rather than of everything the process did before.

    Linux only (writing ``5`` to ``/proc/self/clear_refs``, Linux >= 4.0). Returns whether it worked; where it
    did not, :func:`peak_rss_bytes` stays the process's high-water mark.
    """
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


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
