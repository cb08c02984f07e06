"""Random-init tiny models of four families (and SmolLM2's shapes), built in milliseconds with a fixed seed."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from .tokenizer import BYTE_VOCAB_SIZE

if TYPE_CHECKING:
    from transformers import PretrainedConfig, PreTrainedModel
from .hf import BUILD_SEED, auto_class, quiet_transformers, seeded

__all__ = ["SMOL_SHAPES", "TINY_DIMS", "build_tiny", "count_parameters"]


TINY_DIMS = {"hidden": 128, "layers": 2, "heads": 4, "intermediate": 256, "positions": 512}
# SmolLM2-135M's shapes, random init: the model-level benchmark's subject (no download, any machine).
SMOL_SHAPES = {
    "hidden": 576,
    "layers": 30,
    "heads": 9,
    "kv_heads": 3,
    "intermediate": 1536,
    "positions": 2048,
    "vocab": 49152,
    "tie": True,
}


# --------------------------------------------------------------------------------------------- tiny models


def _tiny_config(architecture: str, task: str, dims: dict | None = None) -> PretrainedConfig:
    """Config of a random-init model whose vocabulary covers the byte tokenizer's 260 ids.

    Args:
        architecture: ``llama``, ``opt``, ``gpt2`` or ``roberta``.
        task: one of :data:`TASKS`; RoBERTa becomes a decoder for ``causal-lm``.
        dims: sizes (default: the tiny ones); ``vocab`` may exceed 260 to mimic a real model's head.

    Returns:
        A transformers config.
    """
    from transformers import GPT2Config, LlamaConfig, OPTConfig, RobertaConfig

    d = dims or TINY_DIMS
    ids = {
        "vocab_size": d.get("vocab", BYTE_VOCAB_SIZE),
        "pad_token_id": 0,
        "bos_token_id": 1,
        "eos_token_id": 2,
    }
    if architecture == "llama":
        return LlamaConfig(
            hidden_size=d["hidden"],
            intermediate_size=d["intermediate"],
            num_hidden_layers=d["layers"],
            num_attention_heads=d["heads"],
            num_key_value_heads=d.get("kv_heads", d["heads"]),
            max_position_embeddings=d["positions"],
            tie_word_embeddings=d.get("tie", False),
            **ids,
        )
    if architecture == "opt":
        return OPTConfig(
            hidden_size=d["hidden"],
            word_embed_proj_dim=d["hidden"],
            ffn_dim=d["intermediate"],
            num_hidden_layers=d["layers"],
            num_attention_heads=d["heads"],
            max_position_embeddings=d["positions"],
            **ids,
        )
    if architecture == "gpt2":
        return GPT2Config(
            n_embd=d["hidden"], n_inner=d["intermediate"], n_layer=d["layers"], n_head=d["heads"],
            n_positions=d["positions"], **ids,
        )  # fmt: skip
    if architecture == "roberta":
        return RobertaConfig(
            hidden_size=d["hidden"],
            intermediate_size=d["intermediate"],
            num_hidden_layers=d["layers"],
            num_attention_heads=d["heads"],
            max_position_embeddings=d["positions"] + 2,  # RoBERTa positions start after padding_idx
            is_decoder=task == "causal-lm",
            **ids,
        )
    raise ValueError(f"No tiny config for architecture {architecture!r}.")


def build_tiny(architecture: str, task: str, num_labels: int, dims: dict | None = None) -> PreTrainedModel:
    """A random-init model of ``architecture`` for ``task`` with :data:`TINY_DIMS` (or ``dims``), seeded."""
    config = _tiny_config(architecture, task, dims)
    if task == "sequence-classification":
        config.num_labels = num_labels
    with seeded(BUILD_SEED), quiet_transformers():
        model = auto_class(task).from_config(config)
    return model


def count_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())  # parameters() yields a tied weight once
