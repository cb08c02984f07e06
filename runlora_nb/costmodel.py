"""A small machine cost model for chain pairs: roofline GEMMs plus the per-element work around them.

For each (device, base dtype, adapter dtype) a :class:`CostModel` predicts seconds as

    GEMM (m, k, n):   flops / rate(dtype)  +  bytes(mk + kn + mn [+ mn read when accumulating]) / bandwidth
                      + a fixed per-call overhead
    dropout:          mask generation and the masked copies, per element of N×i, in forward and backward
    quantized base:   one dequantization of the i×o weight per forward, one more per backward that needs dX
    mixed dtypes:     casts of X and dY to the adapter dtype

The rates are measured once per process and device/dtype in a fraction of a second (:func:`calibrate`) and
cached as JSON next to the plan cache, keyed by torch version, device and thread count.
"""

from __future__ import annotations

import contextlib
import json
import os
import statistics
import threading
import time
from dataclasses import asdict, dataclass

import torch

from .chains import BACKWARD, FORWARD, Gemm, Needs
from .paths import atomic_write_text, cache_dir

__all__ = ["CostModel", "calibrate", "get_model"]

_FILE = "calibration.json"
_lock = threading.Lock()
_models: dict[tuple[str, str, str], CostModel] = {}


@dataclass(frozen=True)
class CostModel:
    """Calibrated rates for one device and pair of dtypes.

    Attributes:
        device: ``"cpu"`` or ``"cuda"``.
        base_dtype: dtype name of the base products.
        adapter_dtype: dtype name of the adapter products.
        base_flops: sustained GEMM rate in the base dtype, FLOP/s.
        adapter_flops: sustained GEMM rate in the adapter dtype, FLOP/s.
        bandwidth: effective memory bandwidth of a skinny GEMM / elementwise pass, bytes/s.
        overhead: fixed seconds per kernel call.
        mask_per_element: seconds per element to generate a dropout mask.
    """

    device: str
    base_dtype: str
    adapter_dtype: str
    base_flops: float
    adapter_flops: float
    bandwidth: float
    overhead: float
    mask_per_element: float

    def describe(self) -> str:
        return (
            f"{self.device} {self.base_dtype}: {self.base_flops / 1e9:.0f} GFLOP/s, "
            f"{self.bandwidth / 1e9:.0f} GB/s"
        )

    def _itemsize(self, name: str) -> int:
        return getattr(torch, name).itemsize

    def gemm_seconds(self, g: Gemm, dtype: str, rate: float) -> float:
        """Predicted seconds of one GEMM."""
        elems = g.m * g.k + g.k * g.n + g.m * g.n * (2 if g.accumulate else 1)
        return g.flops / rate + elems * self._itemsize(dtype) / self.bandwidth + self.overhead

    def chain_seconds(self, chain_id: str, n: int, i: int, o: int, r: int, needs: Needs) -> float:
        """Predicted seconds of one chain's GEMMs. Products touching the full (i, o) or N×o/N×i sizes
        with the base weight run in the base dtype; all others in the adapter dtype."""
        chain = FORWARD.get(chain_id) or BACKWARD[chain_id]
        total = 0.0
        for g in chain.gemms(n, i, o, r, needs):
            base = r not in (g.m, g.k, g.n) and not (chain.kind == "bwd" and _is_g(g, n, i, o))
            dtype, rate = (
                (self.base_dtype, self.base_flops) if base else (self.adapter_dtype, self.adapter_flops)
            )
            total += self.gemm_seconds(g, dtype, rate)
        return total

    def pair_seconds(
        self, fwd: str, bwd: str, n: int, i: int, o: int, r: int, needs: Needs, dropout: bool, quant: str
    ) -> float:
        """Predicted seconds of forward + backward, including the work every pair shares."""
        needs = Needs(*needs)
        t = self.chain_seconds(fwd, n, i, o, r, needs)
        if needs.any:
            t += self.chain_seconds(bwd, n, i, o, r, needs)
        passes = 0  # elementwise passes over N×i
        if dropout:
            regen = 2 if (needs.adapter or needs.dx) else 1
            t += regen * n * i * self.mask_per_element
            passes += 2 + (1 if needs.dx else 0)
        if self.adapter_dtype != self.base_dtype:
            passes += 1 + (1 if needs.adapter else 0)
        t += passes * n * i * self._itemsize(self.base_dtype) * 2 / self.bandwidth
        if quant:
            t += (1 + (1 if needs.dx else 0)) * i * o * dequant_per_element(self.device, self.base_dtype)
        return t


def _is_g(g: Gemm, n: int, i: int, o: int) -> bool:
    """G = XᵀdY is (o, N, i): large, and in the adapter dtype."""
    return (g.m, g.k, g.n) == (o, n, i)


def _median_seconds(fn, reps: int) -> float:
    fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _sync(device: str):
    return torch.cuda.synchronize if device == "cuda" else (lambda: None)


def _randn(*shape: int, device: str, dtype: torch.dtype) -> torch.Tensor:
    """Random data from a private generator: calibrating must not move the user's RNG stream."""
    return torch.randn(*shape, generator=torch.Generator().manual_seed(0)).to(device=device, dtype=dtype)


def _gemm_rate(device: str, dtype: torch.dtype) -> float:
    size = 1024 if (device == "cuda" or dtype.itemsize == 2) else 768
    a = _randn(size, size, device=device, dtype=dtype)
    b = _randn(size, size, device=device, dtype=dtype)
    sync = _sync(device)

    def run():
        a @ b
        sync()

    return 2 * size**3 / _median_seconds(run, 3)


def calibrate(device: str = "cpu", base_dtype: str = "float32", adapter_dtype: str = "float32") -> CostModel:
    """Measure the rates of a :class:`CostModel` (about 0.1–0.5 s on a 2-core CPU).

    Args:
        device: ``"cpu"`` or ``"cuda"``.
        base_dtype: dtype name for the base products.
        adapter_dtype: dtype name for the adapter products.

    Returns:
        The fitted model (not cached; see :func:`get_model`).
    """
    from .dropout import keep_mask

    bd, ad = getattr(torch, base_dtype), getattr(torch, adapter_dtype)
    sync = _sync(device)
    base_rate = _gemm_rate(device, bd)
    adapter_rate = base_rate if ad == bd else _gemm_rate(device, ad)

    # bandwidth from a skinny, memory-bound GEMM: (4096, 1024) @ (1024, 8)
    x = _randn(4096, 1024, device=device, dtype=bd)
    a = _randn(1024, 8, device=device, dtype=bd)

    def skinny():
        x @ a
        sync()

    t_skinny = _median_seconds(skinny, 5)
    tiny_a, tiny_b = _randn(8, 8, device=device, dtype=bd), _randn(8, 8, device=device, dtype=bd)

    def tiny():
        tiny_a @ tiny_b
        sync()

    overhead = _median_seconds(tiny, 20)
    bandwidth = x.numel() * x.element_size() / max(t_skinny - overhead, 1e-7)

    def mask():
        keep_mask((512, 1024), 0.1, 1234, device)
        sync()

    mask_per_element = max(_median_seconds(mask, 5) - overhead, 0.0) / (512 * 1024)
    return CostModel(
        device,
        base_dtype,
        adapter_dtype,
        base_rate,
        adapter_rate,
        bandwidth,
        overhead,
        mask_per_element,
    )


_dequant_costs: dict[tuple[str, str], float] = {}


def dequant_per_element(device: str, dtype: str) -> float:
    """Seconds per weight element to dequantize nf4 to ``dtype`` (measured once per process on first use).

    The cost is the same for every chain pair (one dequantization per forward, one more per backward that
    needs dX), so it shifts predicted times, not the ranking.
    """
    key = (device, dtype)
    if key not in _dequant_costs:
        import bitsandbytes.functional as F  # only reached for quantized bases, so bitsandbytes is loaded

        w = _randn(1024, 1024, device=device, dtype=torch.float32)
        packed, state = F.quantize_4bit(w, quant_type="nf4")

        def run():
            F.dequantize_4bit(packed, state).to(getattr(torch, dtype))
            _sync(device)()

        _dequant_costs[key] = _median_seconds(run, 3) / w.numel()
    return _dequant_costs[key]


def _cache_key(device: str, base_dtype: str, adapter_dtype: str) -> str:
    threads = torch.get_num_threads() if device == "cpu" else torch.cuda.get_device_name()
    return f"{device}|{base_dtype}|{adapter_dtype}|{torch.__version__}|{threads}|{os.cpu_count()}"


def get_model(device: str, base_dtype: str, adapter_dtype: str) -> CostModel:
    """The cost model for this device and dtypes: from memory, else the JSON cache, else calibrated now."""
    mkey = (device, base_dtype, adapter_dtype)
    model = _models.get(mkey)
    if model is not None:
        return model
    with _lock:
        if mkey in _models:
            return _models[mkey]
        path = cache_dir() / _FILE
        try:
            stored = json.loads(path.read_text())
            stored = stored if isinstance(stored, dict) else {}
        except (OSError, ValueError):
            stored = {}
        key = _cache_key(*mkey)
        try:
            model = CostModel(**stored[key])
        except (KeyError, TypeError):
            model = calibrate(*mkey)
            stored[key] = asdict(model)
            with contextlib.suppress(OSError):
                atomic_write_text(path, json.dumps(stored, indent=1, sort_keys=True))
        _models[mkey] = model
        return model
