"""Count exactly what autograd keeps for backward (``torch.autograd.graph.saved_tensors_hooks``).

Every tensor an autograd node saves passes through the pack hook. :class:`SavedTensorRecorder` records each
one with the module that was running when it was saved, and tells parameters (and views of them) apart from
activations by their storage. Storages are counted once: PEFT saves the same X for the base product and for
``lora_A`` at dropout 0, which costs memory once.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import pandas as pd
import torch
from torch import nn

__all__ = ["SavedTensor", "SavedTensorRecorder", "activation_bytes"]


@dataclass(frozen=True)
class SavedTensor:
    """One tensor saved for backward.

    Attributes:
        module: path of the innermost module running when it was saved ("" outside any module).
        shape: its shape.
        dtype: its dtype name.
        bytes: numel × itemsize of the tensor as saved.
        kind: ``"activation"``, ``"parameter"`` (a parameter or a view of one) or ``"mask"`` (bool tensors).
        storage: data pointer of its storage (identifies duplicates).
    """

    module: str
    shape: tuple[int, ...]
    dtype: str
    bytes: int
    kind: str
    storage: int


@dataclass
class SavedTensorRecorder:
    """Context manager recording every tensor saved for backward.

    Args:
        model: optional module tree; when given, each saved tensor is attributed to the module running at the
            time and the model's parameters are recognised as parameters.

    Example:
        >>> with SavedTensorRecorder(model) as rec:
        ...     loss = model(x).sum()
        >>> rec.activation_bytes()
    """

    model: nn.Module | None = None
    records: list[SavedTensor] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._stack: list[str] = []
        self._handles: list = []
        self._param_storages: set[int] = set()

    def _pack(self, t: torch.Tensor):
        try:
            ptr = t.untyped_storage().data_ptr()
        except (RuntimeError, NotImplementedError):  # tensors without storage (e.g. some subclasses)
            ptr = id(t)
        if isinstance(t, nn.Parameter) or ptr in self._param_storages:
            kind = "parameter"
        elif t.dtype == torch.bool:
            kind = "mask"
        else:
            kind = "activation"
        module = self._stack[-1] if self._stack else ""
        nbytes = t.numel() * t.element_size()
        self.records.append(
            SavedTensor(module, tuple(t.shape), str(t.dtype).removeprefix("torch."), nbytes, kind, ptr)
        )
        return t

    def __enter__(self) -> SavedTensorRecorder:
        self.records.clear()
        if self.model is not None:
            self._param_storages = {p.untyped_storage().data_ptr() for p in self.model.parameters()}
            self._param_storages |= {b.untyped_storage().data_ptr() for b in self.model.buffers()}
            for name, mod in self.model.named_modules():
                self._handles.append(mod.register_forward_pre_hook(self._enter_module(name)))
                self._handles.append(mod.register_forward_hook(self._exit_module))
        self._ctx = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)
        self._ctx.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._ctx.__exit__(*exc)
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self._stack.clear()

    def _enter_module(self, name: str):
        def hook(_module, _args):
            self._stack.append(name)

        return hook

    def _exit_module(self, _module, _args, _out):
        if self._stack:
            self._stack.pop()

    def unique(self, kinds: tuple[str, ...] = ("activation", "mask")) -> list[SavedTensor]:
        """Records of the given kinds, one per storage (the largest view seen of each)."""
        best: dict[int, SavedTensor] = {}
        for rec in self.records:
            if rec.kind in kinds and (rec.storage not in best or rec.bytes > best[rec.storage].bytes):
                best[rec.storage] = rec
        return list(best.values())

    def activation_bytes(self) -> int:
        """Bytes of distinct non-parameter tensors kept for backward (activations and masks)."""
        return sum(r.bytes for r in self.unique())

    def table(self) -> pd.DataFrame:
        """Tidy DataFrame of distinct saved tensors: module, shape, dtype, bytes, kind, storage."""
        cols = ["module", "shape", "dtype", "bytes", "kind", "storage"]
        rows = [{c: getattr(r, c) for c in cols} for r in self.unique(("activation", "mask", "parameter"))]
        return pd.DataFrame(rows, columns=cols)


def activation_bytes(fn, *args, model: nn.Module | None = None, **kwargs) -> int:
    """Run ``fn(*args, **kwargs)`` and return the bytes of distinct activations autograd saved."""
    with SavedTensorRecorder(model) as rec:
        fn(*args, **kwargs)
    return rec.activation_bytes()
