"""Where a run trains: the device a config names, the mixed precision users expect there, batches moved to it.

``"auto"`` picks CUDA, then MPS, then the CPU, so a notebook that moves next to a GPU trains on it without an
edit. Mixed precision follows what users of the HF Trainer and PEFT expect on each device: on a CUDA device
with bf16 support, an fp32 base trains under bf16 autocast while the adapters stay fp32 parameters (like PEFT's
default); elsewhere the run computes in the config's dtype.
"""

from __future__ import annotations

import contextlib

import torch

__all__ = ["AUTOCAST_CHOICES", "autocast_dtype", "autocast_for", "device_choices", "is_device_name", "move_batch",
           "peak_memory", "resolve_device", "to_device"]  # fmt: skip

AUTOCAST_CHOICES = ("auto", "off", "bf16", "fp16")


def _mps_available() -> bool:
    mps = getattr(torch.backends, "mps", None)
    return bool(mps is not None and mps.is_available())


def device_choices() -> tuple[str, ...]:
    """``"auto"`` and the devices this machine has (``"cpu"``, ``"cuda"``, ``"cuda:1"``, ``"mps"``)."""
    out = ["auto"]
    if torch.cuda.is_available():
        out.append("cuda")
        out += [f"cuda:{k}" for k in range(1, torch.cuda.device_count())]
    if _mps_available():
        out.append("mps")
    return (*out, "cpu")


def is_device_name(name: object) -> bool:
    """Whether ``name`` parses as a device (whether this machine has it is checked when a run starts)."""
    if name == "auto":
        return True
    try:
        torch.device(name)
    except (RuntimeError, TypeError):
        return False
    return True


def resolve_device(name: str | torch.device | None) -> torch.device:
    """The device ``name`` stands for: ``"auto"`` (or None) is CUDA, then MPS, then the CPU.

    Raises:
        ValueError: an unknown device name, or a device this machine does not have (the message lists
            :func:`device_choices`).
    """
    if name is None or name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        return torch.device("mps") if _mps_available() else torch.device("cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError) as err:  # the same parse as is_device_name, with the reason
        raise ValueError(
            f"train.device: {name!r} is not a device name ({err}); use one of {device_choices()}"
        ) from err
    missing = (
        (device.type == "cuda" and (not torch.cuda.is_available() or (device.index or 0) >= torch.cuda.device_count()))
        or (device.type == "mps" and not _mps_available())
    )  # fmt: skip
    if missing:
        raise ValueError(
            f"train.device: this machine has no {name!r} device (torch {torch.__version__}, CUDA "
            f"{'available' if torch.cuda.is_available() else 'unavailable'}); use one of {device_choices()}"
        )
    return device


def autocast_dtype(device: torch.device, autocast: str, base_dtype: str) -> torch.dtype | None:
    """The autocast dtype a run uses on ``device``, or None for none.

    Args:
        device: the resolved device.
        autocast: ``"auto"`` (bf16 on a CUDA device that supports it when the base is fp32; none elsewhere),
            ``"off"``, ``"bf16"`` or ``"fp16"``.
        base_dtype: the config's base dtype (``"fp32"``, ``"bf16"``, ``"fp16"``); a half base needs none.

    Raises:
        ValueError: an unknown ``autocast`` value.
    """
    if autocast not in AUTOCAST_CHOICES:
        raise ValueError(f"train.device: autocast must be one of {AUTOCAST_CHOICES}, got {autocast!r}")
    if autocast == "off":
        return None
    if autocast == "auto":
        if device.type != "cuda" or base_dtype != "fp32" or not torch.cuda.is_bf16_supported():
            return None
        return torch.bfloat16
    return torch.bfloat16 if autocast == "bf16" else torch.float16


def autocast_for(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    """``torch.autocast`` for ``device`` and ``dtype``, or a no-op context when ``dtype`` is None."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def to_device(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """``model`` on ``device``; untouched when every parameter is there already (a quantized CPU base is not
    re-packed by a no-op move)."""
    if all(
        p.device.type == device.type and (device.index is None or p.device == device)
        for p in model.parameters()
    ):
        return model
    return model.to(device)


def move_batch(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    """``batch`` on ``device``; to CUDA through pinned host memory, so the copy can overlap compute."""
    if device.type == "cpu":
        return batch
    if device.type == "cuda":
        return {k: v.pin_memory().to(device, non_blocking=True) for k, v in batch.items()}
    return {k: v.to(device) for k, v in batch.items()}


def peak_memory(device: torch.device, host_peak: int) -> int:
    """Peak bytes so far: the CUDA allocator's peak on a CUDA device, else ``host_peak`` (the process's RSS)."""
    if device.type == "cuda" and torch.cuda.is_initialized():
        return int(torch.cuda.max_memory_allocated(device))
    return host_peak
