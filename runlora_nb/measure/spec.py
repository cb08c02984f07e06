"""Frozen benchmark settings and results: :class:`LayerSpec`, :class:`Measurement`, the shape grid and column names.

Lowest module of the measure layer; everything that races or reports imports its vocabulary from here.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass

import torch

__all__ = ["DTYPES", "GRID", "LAYER_COLUMNS", "SPEC_COLUMNS", "LayerSpec", "Measurement", "dtype_name"]


DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def dtype_name(name: str | torch.dtype) -> str:
    """Normalise ``"bf16"`` / ``"bfloat16"`` / ``torch.bfloat16`` to ``"bfloat16"``."""
    if isinstance(name, torch.dtype):
        return str(name).removeprefix("torch.")
    name = DTYPES.get(name, name)
    if not isinstance(getattr(torch, name, None), torch.dtype):
        raise ValueError(f"unknown dtype {name!r}; use one of fp32, bf16, fp16")
    return name


@dataclass(frozen=True)
class LayerSpec:
    """One layer shape and setting to race.

    Attributes:
        tokens: N (batch × sequence).
        in_features: i.
        out_features: o.
        rank: r.
        dtype: base dtype (``"float32"``, ``"bfloat16"``, ``"float16"`` or short names).
        adapter_dtype: adapter dtype; None means the same as ``dtype`` (a "bf16 row" is bf16 throughout, and
            PEFT is built the same way, ``autocast_adapter_dtype=False``).
        dropout: adapter dropout.
        quant: ``""``, ``"nf4"``, ``"fp4"`` or ``"int8"`` base weights (bitsandbytes).
        bias: base layer has a bias.
        device: ``"cpu"`` or ``"cuda"``.
        x_requires_grad: the input needs a gradient (a layer in the middle of a network).
        mode: planner mode for the planner's candidate.
    """

    tokens: int = 2048
    in_features: int = 1024
    out_features: int = 1024
    rank: int = 16
    dtype: str = "float32"
    adapter_dtype: str | None = None
    dropout: float = 0.0
    quant: str = ""
    bias: bool = False
    device: str = "cpu"
    x_requires_grad: bool = True
    mode: str = "auto"

    def __post_init__(self) -> None:
        object.__setattr__(self, "dtype", dtype_name(self.dtype))
        if self.adapter_dtype is not None:
            object.__setattr__(self, "adapter_dtype", dtype_name(self.adapter_dtype))
        if self.quant not in ("", "nf4", "fp4", "int8"):
            raise ValueError(f"LayerSpec: quant must be '', 'nf4', 'fp4' or 'int8', got {self.quant!r}")
        if min(self.tokens, self.in_features, self.out_features, self.rank) <= 0:
            raise ValueError(f"LayerSpec: sizes must be positive, got {self}")
        if torch.device(self.device).type == "cuda" and not torch.cuda.is_available():
            raise ValueError(
                f"LayerSpec: device {self.device!r} is not available here (torch {torch.__version__}, "
                "torch.cuda.is_available() is False); use device='cpu'"
            )

    @property
    def shape(self) -> tuple[int, int, int, int]:
        return self.tokens, self.in_features, self.out_features, self.rank

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)

    @property
    def torch_adapter_dtype(self) -> torch.dtype:
        return getattr(torch, self.adapter_dtype or self.dtype)

    def label(self) -> str:
        q = f" {self.quant}" if self.quant else ""
        return f"N={self.tokens} {self.in_features}→{self.out_features} r={self.rank} {self.dtype}{q} p={self.dropout}"


# The issue-3 grid: (N, i, o, r).
GRID: tuple[tuple[int, int, int, int], ...] = (
    (2048, 1024, 1024, 16),
    (2048, 2048, 2048, 16),
    (4096, 768, 768, 8),
    (1024, 4096, 4096, 64),
    (2048, 576, 1536, 8),
    (512, 4096, 4096, 8),
)


@dataclass(frozen=True)
class Measurement:
    """The state of one candidate after a round (``final`` once its last round is in).

    Attributes:
        candidate: ``"frozen"``, ``"peft"``, ``"fwd1+bwd2"`` …, or ``"runlora"`` (the planner's choice).
        kind: ``"floor"``, ``"peft"``, ``"pair"`` or ``"plan"``.
        fwd: forward chain id (pairs and plan), else "".
        bwd: backward chain id, else "".
        samples: seconds per forward + backward, one per round so far.
        saved_bytes: activation bytes autograd keeps (exact, via saved_tensors_hooks).
        peak_bytes: allocator peak of one step above its start (CUDA), else None.
        flops: matmul FLOPs of one forward + backward.
        predicted_s: the cost model's prediction (pairs and plan), else None.
        final: True when this candidate is done.
    """

    candidate: str
    kind: str
    fwd: str
    bwd: str
    samples: tuple[float, ...]
    saved_bytes: int
    peak_bytes: int | None
    flops: int
    predicted_s: float | None
    final: bool = False

    @property
    def median(self) -> float:
        return statistics.median(self.samples) if self.samples else math.nan

    @property
    def iqr(self) -> float:
        if len(self.samples) < 2:
            return 0.0
        q = statistics.quantiles(self.samples, n=4, method="inclusive")
        return q[2] - q[0]


# The columns that identify a layer setting in tidy tables (one group per LayerSpec).
SPEC_COLUMNS = ("tokens", "in_features", "out_features", "rank", "dtype", "dropout", "quant")

LAYER_COLUMNS = [
    "candidate",
    "kind",
    "fwd",
    "bwd",
    "median_s",
    "iqr_s",
    "ratio_frozen",
    "ratio_peft",
    "saved_bytes",
    "saved_over_x",
    "peak_bytes",
    "flops",
    "predicted_s",
    "reps",
    *SPEC_COLUMNS,
    "device",
]
