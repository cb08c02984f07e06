"""Loading helpers of the zoo: ``from_pretrained`` with the zoo's conventions, tokenizers, quantized loads.

Below :mod:`.zoo`; the error messages take a ``fix`` so a cached zoo model names ``runlora-nb fetch NAME --force``
and a local folder names ``save_pretrained``.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from .hf import BUILD_SEED, QUANTIZATIONS, auto_class, quiet_transformers, seeded

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

__all__ = [
    "check_positions",
    "finish",
    "guard_cpu_repack",
    "load_folder",
    "load_tokenizer",
    "positions_limit",
    "quantization_support",
    "quantize_tiny",
    "require_quantization",
]


def require_quantization(quantization: str) -> None:
    """Check that ``quantization`` is known and that bitsandbytes imports on this machine.

    Raises:
        ValueError: unknown quantization.
        RuntimeError: bitsandbytes cannot be imported here.
    """
    if quantization not in QUANTIZATIONS:
        raise ValueError(
            f"quantization must be None or one of {', '.join(QUANTIZATIONS)}, got {quantization!r}."
        )
    try:
        with quiet_transformers():
            import bitsandbytes  # noqa: F401
    except Exception as exc:
        raise RuntimeError(
            f"quantization={quantization!r} needs bitsandbytes, which failed to import here ({exc}). "
            "Install bitsandbytes>=0.45 (`pip install bitsandbytes`) or load with quantization=None."
        ) from exc


def quantization_support() -> dict[str, str | None]:
    """Which quantized bases this machine can load, for pickers that disable what cannot run.

    Returns:
        ``{"nf4": None | reason, "fp4": …, "int8": …}``: None where :func:`load_model` accepts the
        quantization here, else the reason it would refuse (the message of its check).
    """
    support: dict[str, str | None] = {}
    for quantization in QUANTIZATIONS:
        try:
            require_quantization(quantization)
        except (RuntimeError, ValueError) as exc:
            support[quantization] = str(exc)
        else:
            support[quantization] = None
    return support


def bnb_config(quantization: str, dtype: torch.dtype) -> Any:
    """transformers ``BitsAndBytesConfig`` for ``nf4``/``fp4`` (4-bit, double quant) or ``int8``.

    Raises:
        ValueError: unknown quantization.
        RuntimeError: bitsandbytes cannot be imported here.
    """
    require_quantization(quantization)
    from transformers import BitsAndBytesConfig

    if quantization == "int8":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=quantization,
        bnb_4bit_compute_dtype=dtype,
        bnb_4bit_use_double_quant=True,
    )


def load_folder(
    folder: str | Path,
    task: str,
    dtype: torch.dtype,
    quantization: str | None,
    num_labels: int,
    *,
    local_files_only: bool = True,
    fix: str = "",
) -> PreTrainedModel:
    """``from_pretrained`` with the zoo's conventions (no remote code, fixed seed for new heads, quiet).

    Raises:
        RuntimeError: the load failed (names folder, task and quantization).
    """
    kwargs: dict[str, Any] = {
        "local_files_only": local_files_only,
        "trust_remote_code": False,
        "dtype": dtype,
    }
    if task == "sequence-classification":
        kwargs["num_labels"] = num_labels
    if quantization is not None:
        kwargs["quantization_config"] = bnb_config(quantization, dtype)
        kwargs["device_map"] = "cpu"
    try:
        with seeded(BUILD_SEED), quiet_transformers():
            return auto_class(task).from_pretrained(folder, **kwargs)
    except Exception as exc:
        raise RuntimeError(
            f"Loading {folder} for task {task!r} (dtype={dtype}, quantization={quantization}) failed: "
            f"{type(exc).__name__}: {exc}" + (f" {fix}" if fix else "")
        ) from exc


def load_tokenizer(
    folder: str | Path, *, local_files_only: bool = True, fix: str = ""
) -> PreTrainedTokenizerBase:
    """``AutoTokenizer.from_pretrained`` on a folder (no remote code).

    Raises:
        ValueError: no usable tokenizer; the message ends with ``fix`` (default: save one with
            ``tokenizer.save_pretrained``, the fix for a local folder).
    """
    from transformers import AutoTokenizer

    try:
        with quiet_transformers():
            return AutoTokenizer.from_pretrained(
                folder, local_files_only=local_files_only, trust_remote_code=False
            )
    except Exception as exc:
        raise ValueError(
            f"No usable tokenizer in {folder} ({type(exc).__name__}: {exc}). "
            + (fix or "Save one next to the model with tokenizer.save_pretrained(folder).")
        ) from exc


def quantize_tiny(
    model: PreTrainedModel, task: str, dtype: torch.dtype, quantization: str, num_labels: int
) -> PreTrainedModel:
    """Round-trip a tiny model through a temporary folder so bitsandbytes quantizes it on load."""
    with tempfile.TemporaryDirectory(prefix="runlora_nb_tiny_") as tmp:
        with quiet_transformers():
            model.save_pretrained(tmp, safe_serialization=True)
        quantized = load_folder(tmp, task, dtype, quantization, num_labels)
    quantized.config._name_or_path = ""  # like a model built in memory: no (deleted) folder to point at
    quantized.name_or_path = ""
    return quantized


def guard_cpu_repack(model: PreTrainedModel) -> None:
    from ..core.quant import guard_cpu_repack as guard

    guard(model)


def finish(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, task: str) -> PreTrainedModel:
    """Common post-processing: pad ids on tokenizer and config, a known loss for causal LMs, eval mode."""
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    if getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    if task == "causal-lm" and getattr(model, "loss_type", "") is None:
        model.loss_type = "ForCausalLM"  # GPT2LMHeadModel's class name maps to no loss: silence the warning
    return model.eval()


def positions_limit(config: Any) -> int | None:
    """The longest sequence a model's learned or declared positions cover, from its config (or config dict).

    ``n_positions`` (GPT-2) or ``max_position_embeddings`` (LLaMA, OPT, BERT, …); RoBERTa-style models number
    positions after the padding index, so ``pad_token_id + 1`` of them are unusable.

    Args:
        config: a transformers config or the dict of a ``config.json``.

    Returns:
        The limit in tokens, or None when the config declares none.
    """
    get = (
        config.get if isinstance(config, dict) else (lambda key, default=None: getattr(config, key, default))
    )
    limit = get("n_positions") or get("max_position_embeddings")
    if not isinstance(limit, int) or isinstance(limit, bool) or limit <= 0:
        return None
    if get("model_type") in ("roberta", "xlm-roberta", "camembert"):
        limit -= int(get("pad_token_id") or 0) + 1
    return limit


def check_positions(config: Any, seq_len: int, model: str, where: str) -> None:
    """Refuse a sequence longer than the model's positions (learned positions would index out of range,
    rotary ones would silently extrapolate past what the model was built for).

    Raises:
        ValueError: ``seq_len`` exceeds :func:`positions_limit` (names the model, the limit and the fix).
    """
    limit = positions_limit(config)
    if limit is not None and seq_len > limit:
        key = (
            "n_positions"
            if "n_positions" in (config if isinstance(config, dict) else vars(config))
            else ("max_position_embeddings")
        )
        raise ValueError(
            f"{where}: seq_len={seq_len} exceeds the {limit} positions of model {model} ({key} in its config); use a "
            f"sequence length <= {limit}"
        )
