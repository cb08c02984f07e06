"""The memory ledger: predict a fine-tune's memory before training, then measure it and put the two side by side.

A prediction is split into what a PoC has to budget for:

- ``weights_bytes``: the base model's parameters and buffers as stored (bf16, fp16, fp32, or bitsandbytes'
  packed nf4/fp4/int8 storage);
- ``adapter_bytes``: the trainable LoRA parameters; ``grad_bytes``: their gradients; ``optimizer_bytes``:
  AdamW's two moments (same dtype as the parameters);
- ``activation_bytes``: what autograd keeps for backward, where PEFT and runlora_nb differ. It is *predicted*
  from a few tiny forwards: the distinct saved bytes of a transformer are a polynomial in batch B and sequence
  length S, ``c0 + c1·S + c2·S² + c3·B·S + c4·B·S²`` (per-token tensors grow with B·S, rotary tables with S,
  eager attention probabilities with B·S², masks with S²); six probes (B ∈ {1, 2}, S ∈ {s, 2s, 3s}) fit the five
  coefficients exactly, per transformer block, and the residual of the fit is reported;
- ``temporaries_bytes``: the largest transient of a step, the logits' gradient and the loss' softmax
  (2 · B·S·vocab · 4 bytes), an approximation.

:meth:`MemoryLedger.measure` runs one real forward at the full shape under ``saved_tensors_hooks`` (exact saved
bytes), with the process RSS around it and, on CUDA, the allocator's peak; :meth:`MemoryLedger.compare` puts
prediction and measurement in one table. :meth:`MemoryLedger.largest_batch` answers "what fits in N GiB".
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import torch
from torch import nn

from ..core.memory import SavedTensorRecorder
from .model_race import adapter_variants, random_batch

__all__ = ["MemoryLedger", "block_of"]

_BLOCK = re.compile(r"^(.*?\.(?:layers|h|layer|blocks)\.\d+)(?:\.|$)")


def block_of(module: str) -> str:
    """The transformer block a module path belongs to (``model.layers.3.mlp.up_proj`` → ``model.layers.3``);
    modules outside the blocks (embeddings, final norm, head, loss) map to ``"other"``."""
    m = _BLOCK.match(module)
    return m.group(1) if m else "other"


def _basis(batch: int, seq: int) -> list[float]:
    return [1.0, seq, seq * seq, batch * seq, batch * seq * seq]


def _rss_bytes() -> int | None:
    """The process's resident set size now (Linux /proc), None elsewhere."""
    try:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


@dataclass
class _Fit:
    coef: dict[str, np.ndarray]  # block → five coefficients
    residual: float  # largest |fit - probe| / probe over the probes (the model holds when ≈ 0)

    def predict(self, batch: int, seq: int) -> dict[str, float]:
        x = np.array(_basis(batch, seq))
        return {block: max(float(x @ c), 0.0) for block, c in self.coef.items()}


@dataclass
class MemoryLedger:
    """Predict, then measure, the training memory of a LoRA choice on a real model.

    Args:
        model: the base model (not modified: each backend works on a copy).
        r, alpha, dropout, target_modules: the LoRA setting.
        backends: which adapters to compare (``"peft"``, ``"runlora"``, ``"base"``: no adapter).
        probe_seq: the sequence length of the smallest probe (the probes use S = probe_seq, 2·, 3·).

    Raises:
        ValueError: ``probe_seq`` < 2, or an unknown backend.
    """

    model: nn.Module
    r: int = 8
    alpha: float = 16
    dropout: float = 0.05
    target_modules: str | list[str] = "all-linear"
    backends: tuple[str, ...] = ("peft", "runlora")
    probe_seq: int = 16
    _variants: dict[str, nn.Module] = field(default_factory=dict, init=False, repr=False)
    _fits: dict[str, _Fit] = field(default_factory=dict, init=False, repr=False)

    def __post_init__(self) -> None:
        unknown = set(self.backends) - {"base", "peft", "runlora"}
        if unknown:
            raise ValueError(
                f"MemoryLedger: unknown backend {sorted(unknown)[0]!r}; use 'peft', 'runlora' or 'base'"
            )
        if self.probe_seq < 2:
            raise ValueError(f"MemoryLedger: probe_seq must be >= 2, got {self.probe_seq}")

    # ------------------------------------------------------------------------------------------ pieces
    def variant(self, backend: str) -> nn.Module:
        """The model copy with ``backend``'s adapters (made once)."""
        if backend not in self._variants:
            self._variants.update(
                adapter_variants(
                    self.model,
                    r=self.r,
                    alpha=self.alpha,
                    dropout=self.dropout,
                    target_modules=self.target_modules,
                    backends=(backend,),
                )
            )
        return self._variants[backend]

    def _saved_by_block(self, backend: str, batch: int, seq: int) -> tuple[dict[str, int], int]:
        m = self.variant(backend)
        data = random_batch(m, batch, seq)
        with torch.random.fork_rng(devices=[]), SavedTensorRecorder(m) as rec:
            torch.manual_seed(0)
            out = m(**data)
        del out
        by_block: dict[str, int] = {}
        for t in rec.unique():
            by_block[block_of(t.module)] = by_block.get(block_of(t.module), 0) + t.bytes
        return by_block, rec.activation_bytes()

    def _fit(self, backend: str) -> _Fit:
        if backend not in self._fits:
            s = self.probe_seq
            probes = [(b, k * s) for b in (1, 2) for k in (1, 2, 3)]
            seen = [self._saved_by_block(backend, b, q)[0] for b, q in probes]
            blocks = sorted({blk for row in seen for blk in row})
            a = np.array([_basis(b, q) for b, q in probes])
            coef, worst = {}, 0.0
            for blk in blocks:
                y = np.array([row.get(blk, 0) for row in seen], dtype=float)
                c, *_ = np.linalg.lstsq(a, y, rcond=None)
                coef[blk] = c
                err = np.abs(a @ c - y) / np.maximum(y, 1.0)
                worst = max(worst, float(err.max()))
            self._fits[backend] = _Fit(coef, worst)
        return self._fits[backend]

    # ------------------------------------------------------------------------------------------ answers
    def predict(self, batch: int, seq: int) -> pd.DataFrame:
        """The estimate before training, one row per backend.

        Returns:
            backend, batch, seq, weights_bytes, adapter_bytes, grad_bytes, optimizer_bytes, activation_bytes,
            temporaries_bytes, total_bytes, fit_residual.
        """
        _check_shape(batch, seq)
        vocab = int(getattr(getattr(self.model, "config", None), "vocab_size", 0) or 0)
        weights = sum(p.numel() * p.element_size() for p in self.model.parameters())
        weights += sum(b.numel() * b.element_size() for b in self.model.buffers())
        rows = []
        for backend in self.backends:
            m = self.variant(backend)
            trainable = sum(p.numel() * p.element_size() for p in m.parameters() if p.requires_grad)
            if backend == "base":
                trainable = 0
            fit = self._fit(backend)
            acts = sum(fit.predict(batch, seq).values())
            temps = 2 * batch * seq * vocab * 4
            rows.append(
                {
                    "backend": backend,
                    "batch": batch,
                    "seq": seq,
                    "weights_bytes": weights,
                    "adapter_bytes": trainable,
                    "grad_bytes": trainable,
                    "optimizer_bytes": 2 * trainable,
                    "activation_bytes": round(acts),
                    "temporaries_bytes": temps,
                    "total_bytes": weights + 4 * trainable + round(acts) + temps,
                    "fit_residual": fit.residual,
                }
            )
        return pd.DataFrame(rows)

    def per_block(self, batch: int, seq: int, backend: str) -> pd.DataFrame:
        """Predicted and measured activation bytes per transformer block (where PEFT and runlora_nb differ)."""
        _check_shape(batch, seq)
        predicted = self._fit(backend).predict(batch, seq)
        measured, _ = self._saved_by_block(backend, batch, seq)
        blocks = sorted(set(predicted) | set(measured))
        return pd.DataFrame(
            {
                "block": blocks,
                "predicted_bytes": [round(predicted.get(b, 0)) for b in blocks],
                "measured_bytes": [measured.get(b, 0) for b in blocks],
            }
        )

    def measure(self, batch: int, seq: int) -> pd.DataFrame:
        """One real forward + backward per backend at the full shape.

        Returns:
            backend, batch, seq, activation_bytes (exact, saved_tensors_hooks), rss_delta_bytes (process RSS after
            the forward minus before, CPU), cuda_peak_bytes (allocator peak, CUDA only, else None).
        """
        _check_shape(batch, seq)
        rows = []
        for backend in self.backends:
            m = self.variant(backend)
            cuda = next(m.parameters()).is_cuda
            if cuda:
                torch.cuda.reset_peak_memory_stats()
            rss0 = _rss_bytes()
            data = random_batch(m, batch, seq)
            with torch.random.fork_rng(devices=[]), SavedTensorRecorder(m) as rec:
                torch.manual_seed(0)
                loss = m(**data).loss
            rss1 = _rss_bytes()
            loss.backward()
            m.zero_grad(set_to_none=True)
            rows.append(
                {
                    "backend": backend,
                    "batch": batch,
                    "seq": seq,
                    "activation_bytes": rec.activation_bytes(),
                    "rss_delta_bytes": (rss1 - rss0) if rss0 is not None and rss1 is not None else None,
                    "cuda_peak_bytes": torch.cuda.max_memory_allocated() if cuda else None,
                }
            )
        return pd.DataFrame(rows)

    def compare(self, batch: int, seq: int) -> pd.DataFrame:
        """Prediction next to measurement: backend, predicted / measured activation bytes and their ratio."""
        p = self.predict(batch, seq)[["backend", "batch", "seq", "activation_bytes", "total_bytes"]]
        m = self.measure(batch, seq)[["backend", "activation_bytes", "rss_delta_bytes", "cuda_peak_bytes"]]
        df = p.merge(m, on="backend", suffixes=("_predicted", "_measured"))
        df["ratio"] = df["activation_bytes_predicted"] / df["activation_bytes_measured"]
        return df

    def largest_batch(self, budget_bytes: int, seq: int, backend: str) -> int:
        """The largest batch whose predicted total fits ``budget_bytes`` at ``seq`` (0 if none fits)."""
        _check_shape(1, seq)
        if budget_bytes <= 0:
            raise ValueError(f"MemoryLedger.largest_batch: budget_bytes must be > 0, got {budget_bytes}")
        if backend not in self.backends:
            raise ValueError(f"MemoryLedger.largest_batch: backend {backend!r} is not in {self.backends}")

        def total(b: int) -> int:
            return int(self.predict(b, seq).set_index("backend").loc[backend, "total_bytes"])

        if total(1) > budget_bytes:
            return 0
        lo, hi = 1, 2
        while total(hi) <= budget_bytes and hi < 1 << 20:
            lo, hi = hi, hi * 2
        while hi - lo > 1:
            mid = (lo + hi) // 2
            lo, hi = (mid, hi) if total(mid) <= budget_bytes else (lo, mid)
        return lo


def _check_shape(batch: int, seq: int) -> None:
    for name, v in (("batch", batch), ("seq", seq)):
        if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
            raise ValueError(f"MemoryLedger: {name} must be a positive int, got {v!r}")
