"""The X-ray: what autograd keeps for backward, per module and per tensor, with readable names."""

from __future__ import annotations

import pandas as pd
import torch
from torch import nn

from ..core.memory import SavedTensorRecorder
from .layer_race import make_base, peft_layer, runlora_layer
from .model_race import adapter_variants, load_for_race, random_batch
from .spec import LayerSpec, dtype_name

__all__ = ["compare_saved_tensors", "layer_saved_tensors", "saved_tensors_report"]


def saved_tensors_report(
    model: nn.Module, batch: dict[str, torch.Tensor] | torch.Tensor, label: str = ""
) -> pd.DataFrame:
    """The X-ray: every distinct tensor autograd keeps for backward, per module.

    Args:
        model: any model (PEFT, runlora_nb, plain).
        batch: keyword inputs for ``model(**batch)`` or one input tensor.
        label: value of the ``backend`` column.

    Returns:
        Columns module, shape, dtype, bytes, kind (activation / mask / parameter), backend.
    """
    with SavedTensorRecorder(model) as rec:
        out = model(**batch) if isinstance(batch, dict) else model(batch)
    del out
    df = rec.table()
    df["backend"] = label
    return df


def compare_saved_tensors(
    model: str | nn.Module,
    *,
    batch: int = 2,
    seq: int = 64,
    r: int = 8,
    alpha: float | None = None,
    dropout: float = 0.1,
    target_modules=None,
    dtype: str = "fp32",
) -> pd.DataFrame:
    """:func:`saved_tensors_report` for the same model and batch with PEFT and with runlora_nb, stacked.

    Returns:
        The two reports concatenated, ``backend`` = "peft" / "runlora".
    """
    base_model = load_for_race(model, dtype_name(dtype))
    alpha = 2 * r if alpha is None else alpha
    variants = adapter_variants(
        base_model,
        r=r,
        alpha=alpha,
        dropout=dropout,
        target_modules=target_modules,
        backends=("peft", "runlora"),
    )
    data = random_batch(base_model, batch, seq)
    with torch.random.fork_rng(devices=[]):
        frames = [saved_tensors_report(m, data, label=k) for k, m in variants.items()]
    return pd.concat(frames, ignore_index=True)


def layer_saved_tensors(
    n: int, i: int, o: int, r: int, *, dropout: float = 0.0, x_requires_grad: bool = True, dtype: str = "fp32"
) -> pd.DataFrame:
    """What one LoRA layer keeps for backward, PEFT vs runlora_nb, each tensor named.

    Tensors are named by identity where possible (the input X and the parameters W, A, B, by their storage),
    and activations created inside the layer by where and what they are (what a dropout module keeps is its
    mask; XA is (N, r); another (N, i) tensor is the dropped copy D(X), or a cast copy of X).

    Returns:
        Columns backend, tensor (X, XA, dropped copy, mask, W, A, B, …), shape, dtype, bytes, kind.
    """
    spec = LayerSpec(n, i, o, r, dtype=dtype, dropout=dropout, x_requires_grad=x_requires_grad)
    base = make_base(spec)
    modules = {"peft": peft_layer(base, spec), "runlora": runlora_layer(base, spec, "auto")}
    x = torch.randn(n, i, generator=torch.Generator().manual_seed(0)).to(spec.torch_dtype)
    x.requires_grad_(x_requires_grad)
    frames = []
    with torch.random.fork_rng(devices=[]):
        for key, module in modules.items():
            df = saved_tensors_report(module, x, label=key)
            names = _tensor_names(module, x)
            df.insert(1, "tensor", [_name(row, names, n, r, spec.dtype) for row in df.itertuples()])
            frames.append(df)
    out = pd.concat(frames, ignore_index=True)
    return out[["backend", "tensor", "shape", "dtype", "bytes", "kind"]]


def _tensor_names(module: nn.Module, x: torch.Tensor) -> dict[int, str]:
    """storage pointer → "X" / "W" / "A" / "B" for the input and the layer's parameters."""
    names = {x.untyped_storage().data_ptr(): "X"}
    for pname, p in module.named_parameters():
        last = pname.split(".")
        label = (
            "A" if "lora_A" in last else "B" if "lora_B" in last else "W" if last[-1] == "weight" else "bias"
        )
        names.setdefault(p.untyped_storage().data_ptr(), label)
    return names


def _name(row, names: dict[int, str], n: int, r: int, dtype: str) -> str:
    label = names.get(row.storage)
    if label is not None and label != "X" and row.kind == "parameter":
        stored = {"W": 2, "A": 2, "B": 2}.get(label)
        return label if stored is None or not _is_transposed_view(row.shape, label, r) else f"{label}ᵀ"
    if label == "X":
        return "X"
    if row.kind == "mask" or "dropout" in row.module:  # PEFT's CPU dropout keeps its mask as a float tensor
        return "dropout mask"
    if tuple(row.shape) == (n, r):
        return "XA = X·A"
    if row.shape[0] == n:
        return "dropped copy D(X)" if row.dtype == dtype else f"copy of X ({row.dtype})"
    return "×".join(map(str, row.shape))


def _is_transposed_view(shape: tuple[int, ...], label: str, r: int) -> bool:
    """PEFT saves weights as .t() views: A as (i, r) instead of (r, i), B as (r, o) instead of (o, r)."""
    return (label == "A" and shape[-1] == r) or (label == "B" and shape[0] == r)
