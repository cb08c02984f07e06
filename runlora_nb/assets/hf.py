"""Shared helpers for loading transformers models offline: dtype names, quiet loading, seeding, progress.

Lowest module of the assets layer (with :mod:`.tokenizer`); :mod:`.zoo`, :mod:`.tiny`, :mod:`.gguf` and
:mod:`.datasets` build on it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import torch

__all__ = [
    "BUILD_SEED",
    "DTYPE_NAMES",
    "QUANTIZATIONS",
    "TASKS",
    "Progress",
    "auto_class",
    "greedy_continuation",
    "hub_offline",
    "quiet_transformers",
    "resolve_dtype",
    "resolve_progress",
    "seeded",
]


Progress = Callable[[str, float], None]

TASKS: tuple[str, ...] = ("causal-lm", "sequence-classification", "feature-extraction")
QUANTIZATIONS: tuple[str, ...] = ("nf4", "fp4", "int8")
DTYPE_NAMES: dict[str, torch.dtype] = {
    "fp32": torch.float32,
    "float32": torch.float32,
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "fp16": torch.float16,
    "float16": torch.float16,
}


BUILD_SEED = 0


# --------------------------------------------------------------------------------------------- helpers


def resolve_dtype(dtype: torch.dtype | str) -> torch.dtype:
    """Turn ``"fp32"``/``"bf16"``/``"fp16"`` (or long names, or a torch dtype) into a torch floating dtype.

    Args:
        dtype: ``torch.float32``/``bfloat16``/``float16`` or one of ``fp32, float32, bf16, bfloat16, fp16,
            float16``.

    Returns:
        The torch dtype.

    Raises:
        ValueError: an unsupported string or torch dtype.
        TypeError: neither a string nor a torch dtype.
    """
    supported = sorted(set(DTYPE_NAMES.values()), key=str)
    if isinstance(dtype, torch.dtype):
        if dtype not in supported:
            raise ValueError(f"dtype {dtype} is not supported; use one of {', '.join(map(str, supported))}.")
        return dtype
    if isinstance(dtype, str):
        key = dtype.lower().removeprefix("torch.")
        if key not in DTYPE_NAMES:
            raise ValueError(
                f"dtype {dtype!r} is not supported; use one of {', '.join(sorted(DTYPE_NAMES))}."
            )
        return DTYPE_NAMES[key]
    raise TypeError(f"dtype must be a torch.dtype or a string such as 'bf16', got {type(dtype).__name__}.")


@contextlib.contextmanager
def quiet_transformers() -> Iterator[None]:
    """Silence transformers' and bitsandbytes' load-time chatter (warnings, load reports, progress bars).

    Restores the previous verbosity and progress-bar setting on exit.
    """
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    bars = hf_logging.is_progress_bar_enabled()
    bnb_logger = logging.getLogger("bitsandbytes")
    bnb_level = bnb_logger.level
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    bnb_logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            warnings.simplefilter("ignore", FutureWarning)
            yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()
        bnb_logger.setLevel(bnb_level)


@contextlib.contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Run a block with a fixed torch seed without touching the caller's global RNG state."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in {"1", "true", "yes", "on"}


def auto_class(task: str) -> Any:
    import transformers

    return {
        "causal-lm": transformers.AutoModelForCausalLM,
        "sequence-classification": transformers.AutoModelForSequenceClassification,
        "feature-extraction": transformers.AutoModel,
    }[task]


def resolve_progress(name: str, progress: Progress | None) -> Progress:
    """Return ``progress`` or, when None, a reporter that prints one short line per stage.

    Args:
        name: what is being fetched, shown in the printed lines.
        progress: a ``progress(stage, fraction)`` callback or None.

    Returns:
        A ``progress(stage, fraction)`` callable.
    """
    if progress is not None:
        return progress
    seen: set[str] = set()

    def report(stage: str, fraction: float) -> None:
        if stage not in seen:
            seen.add(stage)
            print(f"[runlora_nb] {name}: {stage}", flush=True)

    return report


def greedy_continuation(model: Any, tokenizer: Any, ids: dict[str, torch.Tensor], max_new_tokens: int) -> str:
    """The greedy continuation of one encoded prompt, decoded without the prompt or special tokens.

    Args:
        model: a transformers causal LM (its mode is left as it is).
        tokenizer: its tokenizer (pad and eos ids are passed to ``generate``).
        ids: the encoded prompt, ``input_ids`` (1, T) and optionally ``attention_mask``, on the model's device.
        max_new_tokens: the most tokens to generate.
    """
    out = model.generate(
        **ids,
        max_new_tokens=max_new_tokens,
        do_sample=False,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )  # (1, T + new)
    return tokenizer.decode(out[0, ids["input_ids"].shape[1] :], skip_special_tokens=True)
