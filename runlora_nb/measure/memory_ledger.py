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
  (2 · B·S·vocab · 4 bytes), an approximation;
- ``process_bytes`` (CPU models): what the process holds besides the model (interpreter, torch, transformers,
  data), read as its RSS when the ledger is made minus the model's weights.

The predicted ``total_bytes`` is a **lower bound** of a training process's peak: it leaves out backward's
transients (gradients of the activations, autograd's buffers) and the allocator's slack, which on this
project's machine double the step's share. So nothing that has to fit is decided from it alone:

- :meth:`MemoryLedger.measure` runs one real forward under ``saved_tensors_hooks`` (exact saved bytes) and,
  separately, one real forward + backward whose peak is read from the operating system (the process's peak RSS,
  reset before the step, above its RSS after ``malloc_trim``) or, on CUDA, from the allocator: a measurement
  independent of the hooks the prediction is fitted on. :meth:`MemoryLedger.compare` puts both next to the
  prediction (``ratio``: saved bytes, hooks against the fit; ``step_ratio``: the step, predicted against the
  OS/allocator peak).
- :meth:`MemoryLedger.largest_batch` answers "what fits in N GiB" from measured steps: it fits the measured
  step peak at two small batches, then measures a real step at its answer and backs off until that fits.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import math
import re
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import torch
from torch import nn

from ..common.sysmem import available_bytes, peak_rss_bytes, reset_peak_rss, rss_bytes
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
    return rss_bytes()


def _trim_heap() -> None:
    """Hand freed heap pages back to the OS (glibc ``malloc_trim``), so the RSS before a measured step is what is
    live rather than what earlier steps left cached; a no-op where glibc is not there."""
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


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
    _process_bytes: int = field(default=0, init=False, repr=False)
    last_fit: dict | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        unknown = set(self.backends) - {"base", "peft", "runlora"}
        if unknown:
            raise ValueError(
                f"MemoryLedger: unknown backend {sorted(unknown)[0]!r}; use 'peft', 'runlora' or 'base'"
            )
        if self.probe_seq < 2:
            raise ValueError(f"MemoryLedger: probe_seq must be >= 2, got {self.probe_seq}")
        if not self._on_cuda():  # a CUDA budget is device memory: the host process does not count
            _trim_heap()
            rss = rss_bytes()
            self._process_bytes = max(rss - self._weights_bytes(), 0) if rss is not None else 0

    def _on_cuda(self) -> bool:
        return any(p.is_cuda for p in self.model.parameters())

    def _weights_bytes(self) -> int:
        weights = sum(p.numel() * p.element_size() for p in self.model.parameters())
        return weights + sum(b.numel() * b.element_size() for b in self.model.buffers())

    def _trainable_bytes(self, backend: str) -> int:
        if backend == "base":
            return 0
        return sum(
            p.numel() * p.element_size() for p in self.variant(backend).parameters() if p.requires_grad
        )

    # ------------------------------------------------------------------------------------------ pieces
    def _check_shape(self, batch: int, seq: int) -> None:
        """Refuse a batch or seq that is not a positive int, and a seq beyond the model's positions.

        A prediction past the positions would describe a run that cannot happen (learned positions index out
        of range; rotary ones extrapolate past what the model was built for).
        """
        for name, v in (("batch", batch), ("seq", seq)):
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise ValueError(f"MemoryLedger: {name} must be a positive int, got {v!r}")
        config = getattr(self.model, "config", None)
        if config is not None:
            from ..assets.loading import check_positions

            name = getattr(config, "_name_or_path", None) or type(self.model).__name__
            check_positions(config, seq, repr(name), "MemoryLedger")

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
            temporaries_bytes, process_bytes, total_bytes (a lower bound, see the module docstring),
            fit_residual.
        """
        self._check_shape(batch, seq)
        vocab = int(getattr(getattr(self.model, "config", None), "vocab_size", 0) or 0)
        weights = self._weights_bytes()
        rows = []
        for backend in self.backends:
            trainable = self._trainable_bytes(backend)
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
                    "process_bytes": self._process_bytes,
                    "total_bytes": self._process_bytes + weights + 4 * trainable + round(acts) + temps,
                    "fit_residual": fit.residual,
                }
            )
        return pd.DataFrame(rows)

    def per_block(self, batch: int, seq: int, backend: str) -> pd.DataFrame:
        """Predicted and measured activation bytes per transformer block (where PEFT and runlora_nb differ)."""
        self._check_shape(batch, seq)
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
            the forward minus before, CPU), cuda_peak_bytes (allocator peak, CUDA only, else None),
            step_peak_bytes (a separate forward + backward without hooks: its peak above the memory held before
            it, from the OS or the CUDA allocator; see :meth:`step_peak`).
        """
        self._check_shape(batch, seq)
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
                    "step_peak_bytes": self.step_peak(backend, batch, seq),
                }
            )
        return pd.DataFrame(rows)

    def step_peak(self, backend: str, batch: int, seq: int, steps: int = 2) -> int:
        """The peak memory of real forward + backward steps above what the process held just before them.

        Two steps by default: the second one runs on the heap the first one left fragmented, as every step of
        a training run but the first does, and peaks higher.

        CPU: the process's peak RSS (reset before the step, Linux) minus its RSS after ``malloc_trim``; CUDA:
        the allocator's peak minus what was allocated before. Independent of ``saved_tensors_hooks``: it counts
        backward's transients and the allocator's slack too. The adapters' gradients are included.
        """
        self._check_shape(batch, seq)
        m = self.variant(backend)
        cuda = any(p.is_cuda for p in m.parameters())
        data = random_batch(m, batch, seq)
        if cuda:
            torch.cuda.synchronize()
            before = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
        else:
            _trim_heap()
            before = rss_bytes() or 0
            reset_peak_rss()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            for _ in range(steps):
                m(**data).loss.backward()
                m.zero_grad(set_to_none=True)
        peak = torch.cuda.max_memory_allocated() if cuda else peak_rss_bytes()
        return max(int(peak) - int(before), 0)

    def compare(self, batch: int, seq: int) -> pd.DataFrame:
        """Prediction next to measurement, one row per backend.

        Returns:
            backend, batch, seq, activation_bytes_predicted / _measured (hooks) and their ``ratio``;
            step_bytes_predicted (activations + temporaries + adapter gradients) / step_bytes_measured (the OS or
            allocator peak of a real step, :meth:`step_peak`) and their ``step_ratio`` (below 1: the prediction
            is short by backward's transients); total_bytes (predicted), rss_delta_bytes, cuda_peak_bytes.
        """
        pred = self.predict(batch, seq)
        p = pred[["backend", "batch", "seq", "activation_bytes", "total_bytes"]].copy()
        p["step_bytes"] = pred["activation_bytes"] + pred["temporaries_bytes"] + pred["grad_bytes"]
        cols = ["backend", "activation_bytes", "rss_delta_bytes", "cuda_peak_bytes", "step_peak_bytes"]
        m = self.measure(batch, seq)[cols].rename(columns={"step_peak_bytes": "step_bytes"})
        df = p.merge(m, on="backend", suffixes=("_predicted", "_measured"))
        df["ratio"] = df["activation_bytes_predicted"] / df["activation_bytes_measured"]
        df["step_ratio"] = df["step_bytes_predicted"] / df["step_bytes_measured"].where(
            df["step_bytes_measured"] > 0
        )
        return df

    def largest_batch(
        self, budget_bytes: int, seq: int, backend: str, *, measure: bool = True, headroom: float = 0.3
    ) -> int:
        """The largest batch whose training step fits ``budget_bytes`` at ``seq`` (0 if none fits).

        The budget is a whole training process's peak: on CPU its RSS (what the process holds besides the model,
        the weights, adapters and AdamW's moments, and the step), on CUDA the allocator's memory.

        Args:
            budget_bytes: the budget.
            seq: tokens per sequence.
            backend: one of :attr:`backends`.
            measure: measure real steps (the default): fit :meth:`step_peak` at batches 1 and 4, then measure
                the answer itself and back off until it fits (at most four more steps; a step is not run when
                the budget exceeds the free memory, and ``last_fit["verified"]`` is then False). False: from the
                predicted ``total_bytes`` alone, a lower bound, so the answer is optimistic.
            headroom: the measured step must fit with this fraction to spare. One measured step does not see the
                optimizer's step, later steps' fragmentation or the data loader; on this project's machine a real
                training process's steps peaked up to 21% above the step measured here (tiny-llama, seq 128,
                batch 99: 581 MiB in a fresh process after three AdamW steps, 479 MiB measured here).

        Returns:
            The batch size. ``last_fit`` holds how it was found (measured steps, fixed bytes, verified).

        Raises:
            ValueError: a budget <= 0, an unknown backend, a bad ``seq``.
        """
        self._check_shape(1, seq)
        if budget_bytes <= 0:
            raise ValueError(f"MemoryLedger.largest_batch: budget_bytes must be > 0, got {budget_bytes}")
        if backend not in self.backends:
            raise ValueError(f"MemoryLedger.largest_batch: backend {backend!r} is not in {self.backends}")
        if not measure:
            return self._largest_predicted(budget_bytes, seq, backend)
        if not 0 <= headroom < 1:
            raise ValueError(f"MemoryLedger.largest_batch: headroom must be in [0, 1), got {headroom}")
        trainable = self._trainable_bytes(backend)
        fit = {"budget_bytes": budget_bytes, "headroom": headroom, "steps": [], "verified": True}
        fit["fixed_bytes"] = self._process_bytes + self._weights_bytes()
        self.last_fit = fit
        if budget_bytes <= fit["fixed_bytes"]:
            return 0  # the process and the model alone are over budget: nothing is run
        self.step_peak(backend, 1, seq)  # warm-up: first-call allocations (numba's JIT, kernel caches) stay
        fit["fixed_bytes"] = fixed = self._held_bytes() + 3 * trainable  # + the adapters and AdamW's moments
        room = (budget_bytes - fixed) * (1 - headroom)

        def step(b: int) -> int:
            peak = self.step_peak(backend, b, seq)
            fit["steps"].append((b, peak))
            return peak

        if room <= 0:
            return 0
        d1, d4 = step(1), step(4)
        if d1 > room:
            return 0
        pred = self.predict(2, seq).set_index("backend").loc[backend]
        pred1 = self.predict(1, seq).set_index("backend").loc[backend]
        predicted_slope = float(pred["total_bytes"] - pred1["total_bytes"])
        slope = max((d4 - d1) / 3, predicted_slope, 1.0)
        intercept = max(d1 - slope, 0.0)
        free = available_bytes("cuda" if self._on_cuda() else "cpu")
        safe = free is None or room <= 0.8 * free[0]
        # the largest batch measured to fit, the smallest measured not to
        best, too_big = (4, math.inf) if d4 <= room else (1, 4)
        verified = True
        for _ in range(4):
            cand = min(int((room - intercept) // slope), too_big - 1, 1 << 20)
            if cand <= best:
                break
            if not safe:  # a step that large could exhaust this machine: answer from the fitted line
                best, verified = cand, False
                break
            d = step(cand)
            if d <= room:
                best = cand
                break
            too_big = cand
            slope = max(slope * 1.05, (d - d1) / max(cand - 1, 1))  # the secant through the failed step
        fit["verified"] = verified
        fit["batch"] = best
        return best

    def _held_bytes(self) -> int:
        """What a training process holds before its first step: the runtime as it is after a warm-up step
        (libraries, numba's compiled kernels), and the model once. CPU: this process's RSS after ``malloc_trim``
        less the ledger's own model copies; CUDA: the model's weights (device memory)."""
        if self._on_cuda():
            return self._weights_bytes()
        _trim_heap()
        rss = rss_bytes()
        copies = sum(
            sum(t.numel() * t.element_size() for t in (*m.parameters(), *m.buffers()))
            for m in self._variants.values()
        )
        floor = self._process_bytes + self._weights_bytes()
        return max(rss - copies, floor) if rss is not None else floor

    def _largest_predicted(self, budget_bytes: int, seq: int, backend: str) -> int:
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
