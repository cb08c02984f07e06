"""GGUF checkpoints → plain safetensors: dequantize with transformers' GGUF loader, rebuild, check, save."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from transformers import PreTrainedModel
from .hf import BUILD_SEED, Progress, quiet_transformers, seeded

__all__ = ["check_loadable", "convert_gguf"]


@contextlib.contextmanager
def _gguf_progress(report: Progress) -> Iterator[None]:
    """Route transformers' GGUF dequantization loop (a tqdm bar) to ``report("convert", fraction)``."""
    import transformers.modeling_gguf_pytorch_utils as gguf_utils

    original = getattr(gguf_utils, "tqdm", None)
    if original is None:  # transformers moved the loop: no fractions, the stage is still reported
        yield
        return

    def tracked(iterable: Any, *args: Any, **kwargs: Any) -> Iterator[Any]:
        items = list(iterable)
        step = max(1, len(items) // 20)
        for i, item in enumerate(items):
            if i % step == 0:
                report("convert", i / max(1, len(items)))
            yield item

    gguf_utils.tqdm = tracked
    try:
        yield
    finally:
        gguf_utils.tqdm = original


def convert_gguf(source: Path, gguf_file: str, out: Path, report: Progress) -> None:
    """Dequantize a GGUF checkpoint and save it as plain safetensors + tokenizer in ``out``.

    ``save_pretrained`` refuses GGUF-loaded models, so the weights move into a fresh model built from the
    same config without its ``quantization_config``.

    Raises:
        RuntimeError: the rebuilt model does not match the GGUF state dict or loses its weight tying.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    report("convert", 0.0)
    with quiet_transformers(), _gguf_progress(report):
        gguf_model = AutoModelForCausalLM.from_pretrained(
            source, gguf_file=gguf_file, local_files_only=True, dtype=torch.float32
        )
        tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=gguf_file, local_files_only=True)
    report("convert", 1.0)
    report("save", 0.0)
    model = _rebuild_without_quantization(gguf_model)
    del gguf_model
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.config.pad_token_id = tokenizer.pad_token_id
    with quiet_transformers():
        model.save_pretrained(out, safe_serialization=True)
        tokenizer.save_pretrained(out)
    report("save", 1.0)


def _rebuild_without_quantization(gguf_model: PreTrainedModel) -> PreTrainedModel:
    config_dict = gguf_model.config.to_dict()
    config_dict.pop("quantization_config", None)
    config = type(gguf_model.config).from_dict(config_dict)
    with seeded(BUILD_SEED), quiet_transformers():
        model = type(gguf_model)(config)
    model.load_state_dict(gguf_model.state_dict(), strict=True)
    model.generation_config = gguf_model.generation_config
    if config.tie_word_embeddings and not _tied(model):
        raise RuntimeError("Rebuilt GGUF model lost its tied input/output embeddings; not caching it.")
    return model.eval()


def _tied(model: PreTrainedModel) -> bool:
    out = model.get_output_embeddings()
    return out is not None and out.weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()


def check_loadable(folder: Path) -> None:
    from transformers import AutoConfig

    try:
        AutoConfig.from_pretrained(folder, local_files_only=True)
    except Exception as exc:
        raise RuntimeError(f"The converted model in {folder} has no readable config.json ({exc}).") from exc
