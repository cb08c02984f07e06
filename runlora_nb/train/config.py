"""The fine-tuning config: one frozen dataclass with sensible defaults, and :func:`with_backend`."""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any, Literal

import yaml

from ..assets.zoo import max_positions
from .device import AUTOCAST_CHOICES, is_device_name

__all__ = ["DEFAULT_MODEL", "FineTuneConfig", "config_fields", "load_config", "save_config", "with_backend"]

# The one default model of every entry point (the dataclass, ``runlora-nb train`` with or without --config):
# the zoo's tiny-llama builds in memory, offline, in seconds.
DEFAULT_MODEL = "tiny-llama"
# Numeric fields by kind: YAML 1.1 reads ``3e-4`` (no dot) as a string, so load_config coerces text that
# parses as a number, and __post_init__ checks the kinds so a bad value names its field instead of failing
# in a comparison later.
INT_FIELDS = (
    "r",
    "steps",
    "batch_size",
    "seq_len",
    "grad_accum",
    "warmup_steps",
    "eval_interval",
    "eval_batches",
    "seed",
    "sample_tokens",
    "checkpoint_every",
)
FLOAT_FIELDS = ("alpha", "dropout", "lr", "weight_decay", "max_grad_norm", "lora_plus_ratio")


@dataclass(frozen=True)
class FineTuneConfig:
    """Everything a fine-tuning run depends on.

    Attributes:
        model: zoo name (``tiny-llama``, the default, ``smollm2-135m``, …) or a local folder.
        dataset: dataset name (``sonnets``, ``chatterbot``, …) or a .txt / .jsonl file.
        task: ``"causal-lm"``, ``"instruction"`` or ``"classification"``; None: the dataset's default.
        r: LoRA rank.
        alpha: LoRA alpha.
        dropout: adapter dropout.
        targets: ``"all-linear"``, a list of module names, or None for PEFT's default per architecture.
        quantization: None, ``"nf4"``, ``"fp4"`` or ``"int8"`` base weights.
        dtype: base dtype (``"fp32"``, ``"bf16"``, ``"fp16"``).
        lr: peak learning rate (AdamW).
        weight_decay: AdamW weight decay.
        steps: optimizer steps.
        batch_size: sequences per micro-batch.
        seq_len: tokens per sequence (block size).
        grad_accum: micro-batches per optimizer step.
        warmup_steps: linear warm-up steps.
        schedule: ``"cosine"``, ``"linear"`` or ``"constant"`` after warm-up.
        max_grad_norm: gradient clipping (None: off).
        eval_interval: evaluate every this many steps (and at the end); 0: only at the end.
        eval_batches: validation batches per evaluation.
        seed: one seed for init, data order and dropout masks.
        backend: ``"runlora"`` or ``"peft"``.
        chain: planner mode for the runlora backend.
        output_dir: where the adapter is saved (default: the run folder's ``adapter/`` when the run ledger
            records the run, else a fresh folder under the cache's ``adapters/``).
        sample_prompts: prompts generated from before and after training (causal LM tasks).
        sample_tokens: new tokens per sample.
        gradient_checkpointing: recompute transformer blocks in backward (less memory, more time).
        checkpoint_every: save a resumable checkpoint every this many steps (and always at Stop); 0: only at
            Stop.
        runs_dir: root of the run ledger (default ``$RUNLORA_NB_RUNS``, else the cache's ``runs/``).
        device: ``"auto"`` (CUDA, then MPS, then the CPU), or a device name (``"cpu"``, ``"cuda:1"``, …).
        use_rslora: rank-stabilised scaling alpha / sqrt(r) instead of alpha / r (rsLoRA, Kalajdzievski 2023).
        lora_plus_ratio: LoRA+ (Hayou et al. 2024): the B matrices learn at ``lr × ratio`` (16 in its paper),
            the A matrices at ``lr``; None: one learning rate.
        autocast: mixed precision: ``"auto"`` (bf16 autocast of an fp32 base on a CUDA device that supports
            it, adapters kept fp32; none on the CPU), ``"off"``, ``"bf16"`` or ``"fp16"``.
    """

    model: str = DEFAULT_MODEL
    dataset: str = "sonnets"
    task: str | None = None
    r: int = 8
    alpha: float = 16
    dropout: float = 0.05
    targets: str | tuple[str, ...] | None = "all-linear"
    quantization: str | None = None
    dtype: str = "fp32"
    lr: float = 3e-4
    weight_decay: float = 0.0
    steps: int = 40
    batch_size: int = 4
    seq_len: int = 128
    grad_accum: int = 1
    warmup_steps: int = 4
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    max_grad_norm: float | None = 1.0
    eval_interval: int = 10
    eval_batches: int = 4
    seed: int = 0
    backend: Literal["runlora", "peft"] = "runlora"
    chain: str = "auto"
    output_dir: str | None = None
    sample_prompts: tuple[str, ...] = ("Shall I compare thee to a summer's day?",)
    sample_tokens: int = 24
    gradient_checkpointing: bool = False
    checkpoint_every: int = 20
    runs_dir: str | None = None
    device: str = "auto"
    autocast: str = "auto"
    use_rslora: bool = False
    lora_plus_ratio: float | None = None

    def __post_init__(self) -> None:
        self._check_kinds()
        checks = [
            (
                self.backend in ("runlora", "peft"),
                f"backend must be 'runlora' or 'peft', got {self.backend!r}",
            ),
            (self.schedule in ("cosine", "linear", "constant"), f"unknown schedule {self.schedule!r}"),
            (self.steps >= 1, f"steps must be >= 1, got {self.steps}"),
            (self.batch_size >= 1, f"batch_size must be >= 1, got {self.batch_size}"),
            (self.seq_len >= 8, f"seq_len must be >= 8, got {self.seq_len}"),
            (self.grad_accum >= 1, f"grad_accum must be >= 1, got {self.grad_accum}"),
            (self.lr > 0, f"lr must be > 0, got {self.lr}"),
            (self.eval_interval >= 0, f"eval_interval must be >= 0, got {self.eval_interval}"),
            (
                self.lora_plus_ratio is None or self.lora_plus_ratio > 0,
                f"lora_plus_ratio must be > 0 (or None: one lr), got {self.lora_plus_ratio}",
            ),
            (
                self.autocast in AUTOCAST_CHOICES,
                f"autocast must be one of {AUTOCAST_CHOICES}, got {self.autocast!r}",
            ),
            (
                is_device_name(self.device),
                f"device must be 'auto' or a torch device name such as 'cpu', 'cuda', "
                f"'cuda:1' or 'mps', got {self.device!r}",
            ),
        ]
        for ok, msg in checks:
            if not ok:
                raise ValueError(f"FineTuneConfig: {msg}")
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r < 1:
            raise ValueError(f"FineTuneConfig: r (the LoRA rank) must be a positive int, got {self.r!r}")
        self._check_positions()
        if isinstance(self.targets, list):
            object.__setattr__(self, "targets", tuple(self.targets))
        if isinstance(self.sample_prompts, str | list):
            prompts = (
                (self.sample_prompts,) if isinstance(self.sample_prompts, str) else tuple(self.sample_prompts)
            )
            object.__setattr__(self, "sample_prompts", prompts)

    def _check_kinds(self) -> None:
        """Numbers where numbers belong: ints (an integral float such as 2.0 becomes 2) and floats.

        Raises:
            ValueError: a numeric field holds text, a bool or a fractional value for an int field; the message
                names the field, the value and the type expected.
        """
        for name in INT_FIELDS:
            value = getattr(self, name)
            if name == "r":  # the rank keeps its own message below; only 2.0 -> 2 here
                if isinstance(value, float) and value.is_integer():
                    object.__setattr__(self, name, int(value))
                continue
            if isinstance(value, float) and value.is_integer():
                object.__setattr__(self, name, int(value))
            elif isinstance(value, bool) or not isinstance(value, int):
                raise ValueError(
                    f"FineTuneConfig: {name} must be an integer, got {value!r} ({type(value).__name__}); "
                    f"write a whole number such as {name}: {getattr(FineTuneConfig, name)}"
                )
        for name in FLOAT_FIELDS:
            value = getattr(self, name)
            if value is None and name in ("max_grad_norm", "lora_plus_ratio"):  # None: off
                continue
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise ValueError(
                    f"FineTuneConfig: {name} must be a number, got {value!r} ({type(value).__name__}); "
                    f"write e.g. {name}: {getattr(FineTuneConfig, name)!r}"
                )
        if not isinstance(self.gradient_checkpointing, bool):
            raise ValueError(
                "FineTuneConfig: gradient_checkpointing must be true or false, got "
                f"{self.gradient_checkpointing!r} ({type(self.gradient_checkpointing).__name__})"
            )

    def _check_positions(self) -> None:
        """Refuse a ``seq_len`` beyond the model's positions, read from its config without building it."""
        limit = max_positions(self.model)
        if limit is not None and self.seq_len > limit:
            raise ValueError(
                f"FineTuneConfig: seq_len={self.seq_len} exceeds the {limit} positions of model {self.model!r} "
                f"(n_positions / max_position_embeddings in its config); use seq_len <= {limit}"
            )

    @property
    def tokens_per_step(self) -> int:
        return self.batch_size * self.seq_len * self.grad_accum


def with_backend(config: FineTuneConfig, backend: str) -> FineTuneConfig:
    """The same run on the other backend (for PEFT-vs-runlora_nb overlays)."""
    return replace(config, backend=backend)


def config_fields(path: str | os.PathLike) -> dict[str, Any]:
    """The fields a YAML (or JSON) run config sets, numbers written as text already parsed.

    Args:
        path: a YAML file such as ``{model: tiny-llama, steps: 40, r: 8, lr: 3e-3}``.

    Returns:
        ``{field: value}`` for the fields the file names (the others are left out, so callers can tell
        "not given" from "given the default").

    Raises:
        ValueError: the file is missing, is not a mapping, or names an unknown field (the message lists the
            valid ones).
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise ValueError(
            f"load_config: {path} is not a file; pass the path of a YAML of FineTuneConfig fields"
        )
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise ValueError(f"load_config: {path} is not valid YAML: {exc}") from None
    data = {} if data is None else data
    if not isinstance(data, dict):
        raise ValueError(
            f"load_config: {path} holds a {type(data).__name__}, not a mapping; write one `field: value` per line"
        )
    valid = [f.name for f in fields(FineTuneConfig)]
    unknown = sorted(str(k) for k in data if k not in valid)
    if unknown:
        raise ValueError(
            f"load_config: {path} has unknown field(s) {', '.join(unknown)}; valid fields: {', '.join(valid)}"
        )
    return {k: _number(k, v) for k, v in data.items()}


def _number(name: str, value: Any) -> Any:
    """``value`` parsed as a number when ``name`` is a numeric field and it is text that parses as one.

    PyYAML follows YAML 1.1, where ``3e-4`` (no dot) is a string; text that does not parse is returned as is
    so that FineTuneConfig's check names the field, the value and the expected type.
    """
    if not isinstance(value, str) or name not in INT_FIELDS + FLOAT_FIELDS:
        return value
    try:
        return int(value.strip()) if name in INT_FIELDS else float(value)
    except ValueError:
        pass
    try:
        return float(value)  # "2.0" for an int field: __post_init__ accepts an integral float, refuses 2.5
    except ValueError:
        return value


def config_from_fields(data: dict[str, Any], where: str = "load_config") -> FineTuneConfig:
    """A :class:`FineTuneConfig` from a mapping of fields, a TypeError turned into a ValueError naming ``where``."""
    try:
        return FineTuneConfig(**data)
    except TypeError as exc:  # a value of the wrong kind deep in a check
        raise ValueError(f"{where}: {exc}") from None


def load_config(path: str | os.PathLike, **overrides: Any) -> FineTuneConfig:
    """A :class:`FineTuneConfig` from a YAML (or JSON) mapping of its fields, e.g. ``run.yaml``.

    Args:
        path: a YAML file such as ``{model: tiny-llama, steps: 40, r: 8, lr: 3e-3}``; fields it leaves out
            keep their defaults. Numbers written as text (YAML reads ``3e-4`` as a string) are parsed.
        **overrides: fields that replace the file's (the CLI's ``--runs-dir`` / ``--out``); None: keep the file's.

    Returns:
        The validated config.

    Raises:
        ValueError: the file is missing, is not a mapping, or names an unknown field (the message lists the
            valid ones); a field's value is invalid, e.g. ``lr: fast`` (the message names the field, the value
            and the expected type).
    """
    data = config_fields(path)
    data.update({k: v for k, v in overrides.items() if v is not None})
    return config_from_fields(data, f"load_config: {Path(path).expanduser()}")


def save_config(config: FineTuneConfig, path: str | os.PathLike) -> Path:
    """Write ``config`` as YAML that :func:`load_config` reads back to an equal config.

    Args:
        config: the config.
        path: the YAML file to write (its folder must exist).

    Returns:
        The path.
    """
    data = {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(config).items()}
    path = Path(path).expanduser()
    path.write_text(yaml.safe_dump(data, sort_keys=False, allow_unicode=True), encoding="utf-8")
    return path
