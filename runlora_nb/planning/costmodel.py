"""A small machine cost model for chain pairs, calibrated on this machine in a fraction of a second.

Each chain is a list of GEMMs (:mod:`runlora_nb.core.chains`). A :class:`CostModel` predicts their seconds as

    large GEMM (no side equal to r):   flops / rate(dtype) + per-call overhead
    skinny GEMM (one side is r):       bytes touched / bandwidth(class) + per-call overhead

Rank-8..64 products are bandwidth bound, and how fast a kernel streams its big operand depends on its shape
class, so three classes are calibrated separately (times per byte measured on N=2048, 1024-wide operands):

    ``"n"``       (N, i) @ (i, r)          e.g. XA, T = dY·Bᵀ
    ``"m"``       (N, r)ᵀ @ (N, i)         e.g. dA = Tᵀ·X, dBᵀ = (XA)ᵀ·dY
    ``"k"``       (N, r) @ (r, i) + C      e.g. the rank-r update of dX, W + sAB

(The chains are written so that no skinny product streams a transposed big operand: that form, (N, o)ᵀ @
(N, r), ran 2–4× slower than the "m" form here.)

On top come the work every pair shares — dropout mask generation and masking, dtype casts, the dequantization
of a quantized base — and a fixed per-call cost of the Python/autograd path. Models are cached in memory and as
JSON next to the plan cache, keyed by torch version, device and thread count. Calibration keeps the fastest of
a few repetitions, the least disturbed by other work on a shared machine.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import threading
import time
import warnings
from dataclasses import asdict, dataclass

import torch

from ..common.paths import atomic_write_text, cache_dir
from ..core.chains import BACKWARD, FORWARD, Gemm, Needs

__all__ = [
    "SKINNY_CLASSES",
    "CostModel",
    "calibrate",
    "check_fields",
    "default_model",
    "dequant_per_element",
    "get_model",
    "recalibrate",
]

_FILE = "calibration.json"
_VERSION = 4  # bump when the calibration's fields change
SKINNY_CLASSES = ("n", "m", "k")
_lock = threading.Lock()
_models: dict[tuple[str, str, str], CostModel] = {}


@dataclass(frozen=True)
class CostModel:
    """Calibrated rates for one device and pair of dtypes.

    Attributes:
        device: ``"cpu"`` or ``"cuda"``.
        base_dtype: dtype name of the base products.
        adapter_dtype: dtype name of the adapter products.
        base_flops: large-GEMM rate in the base dtype, FLOP/s.
        adapter_flops: large-GEMM rate in the adapter dtype, FLOP/s.
        skinny_bw: bytes/s of skinny GEMMs in the adapter dtype, per class (see :data:`SKINNY_CLASSES`).
        elementwise_bw: bytes/s of an elementwise pass (copy).
        overhead: seconds per kernel call.
        call_overhead: fixed seconds of one forward + backward call of the layer besides its kernels.
        mask_per_element: seconds per element of one fused dropout pass (mask computed while streaming).
    """

    device: str
    base_dtype: str
    adapter_dtype: str
    base_flops: float
    adapter_flops: float
    skinny_bw: dict[str, float]
    elementwise_bw: float
    overhead: float
    call_overhead: float
    mask_per_element: float

    def describe(self) -> str:
        return (
            f"{self.device} {self.base_dtype}: {self.base_flops / 1e9:.0f} GFLOP/s, skinny "
            f"{min(self.skinny_bw.values()) / 1e9:.0f}–{max(self.skinny_bw.values()) / 1e9:.0f} GB/s"
        )

    def _itemsize(self, name: str) -> int:
        return getattr(torch, name).itemsize

    def gemm_seconds(self, g: Gemm, r: int, base: bool) -> float:
        """Predicted seconds of one GEMM of a chain with rank ``r`` (``base``: a large product in the base dtype;
        a skinny one marked ``in_base`` streams base-dtype bytes at the adapter dtype's calibrated bandwidth)."""
        cls = skinny_class(g, r)
        if cls is None:
            rate = self.base_flops if base else self.adapter_flops
            return g.flops / rate + self.overhead
        elems = g.m * g.k + g.k * g.n + g.m * g.n * (2 if g.accumulate else 1)
        itemsize = self._itemsize(self.base_dtype if g.in_base else self.adapter_dtype)
        return elems * itemsize / self.skinny_bw[cls] + self.overhead

    def chain_seconds(self, chain_id: str, n: int, i: int, o: int, r: int, needs: Needs) -> float:
        """Predicted seconds of one chain's GEMMs. Large products with the base weight (X·W, dY·Wᵀ) run in
        the base dtype; G = XᵀdY and the skinny products in the adapter dtype."""
        chain = FORWARD.get(chain_id) or BACKWARD[chain_id]
        return sum(self.gemm_seconds(g, r, base=not g.trans_a) for g in chain.gemms(n, i, o, r, needs))

    def pair_seconds(
        self, fwd: str, bwd: str, n: int, i: int, o: int, r: int, needs: Needs, dropout: bool, quant: str
    ) -> float:
        """Predicted seconds of forward + backward, including the work every pair shares."""
        needs = Needs(*needs)
        t = self.call_overhead + self.chain_seconds(fwd, n, i, o, r, needs)
        if needs.any:
            t += self.chain_seconds(bwd, n, i, o, r, needs)
        if dropout:  # D(X) in forward; D(X) again for dA / dB, and the masked adapter part of dX, in backward
            masked = 1 + (1 if needs.adapter else 0) + (1 if needs.dx else 0)
            t += masked * n * i * self.mask_per_element
        passes = 0.0  # elementwise passes over N×i in the adapter dtype
        if (
            self.adapter_dtype != self.base_dtype
        ):  # D(X) cast up in forward (not by mixed_only chains), backward
            passes += (0 if FORWARD[fwd].mixed_only else 1) + (1 if needs.adapter else 0)
        t += passes * n * i * self._itemsize(self.adapter_dtype) * 2 / self.elementwise_bw
        if quant:
            t += (1 + (1 if needs.dx else 0)) * i * o * dequant_per_element(self.device, self.base_dtype)
        return t


def skinny_class(g: Gemm, r: int) -> str | None:
    """The calibration class of a GEMM of a rank-``r`` chain, or None for a large product."""
    if g.n == r and g.m != r:
        return "n"
    if g.m == r and g.n != r:
        return "m"
    if g.k == r:
        return "k"
    return None


# -------------------------------------------------------------------------------------------------- calibration


def _best_seconds(fn, reps: int) -> float:
    fn()
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def _sync(device: str):
    return torch.cuda.synchronize if device == "cuda" else (lambda: None)


def _randn(*shape: int, device: str, dtype: torch.dtype) -> torch.Tensor:
    """Random data from a private generator: calibrating must not move the user's RNG stream."""
    return torch.randn(*shape, generator=torch.Generator().manual_seed(0)).to(device=device, dtype=dtype)


def _timed(device: str, fn, reps: int = 6) -> float:
    sync = _sync(device)

    def run():
        fn()
        sync()

    return _best_seconds(run, reps)


def _gemm_rate(device: str, dtype: torch.dtype) -> float:
    size = 1024 if (device == "cuda" or dtype.itemsize == 2) else 768
    a, b = _randn(size, size, device=device, dtype=dtype), _randn(size, size, device=device, dtype=dtype)
    return 2 * size**3 / _timed(device, lambda: a @ b, 5)


def _skinny_bandwidths(device: str, dtype: torch.dtype, overhead: float) -> dict[str, float]:
    n, i, r = 2048, 1024, 16
    x = _randn(n, i, device=device, dtype=dtype)
    a = _randn(r, i, device=device, dtype=dtype)  # (r, i) like lora_A.weight
    t = _randn(n, r, device=device, dtype=dtype)
    out = torch.empty(n, i, device=device, dtype=dtype)
    cases = {
        "n": (lambda: x @ a.t(), Gemm(n, i, r)),
        "m": (lambda: t.t() @ x, Gemm(r, n, i, trans_a=True)),
        "k": (lambda: out.addmm_(t, a), Gemm(n, r, i, accumulate=True)),
    }
    bws = {}
    for cls, (fn, g) in cases.items():
        elems = g.m * g.k + g.k * g.n + g.m * g.n * (2 if g.accumulate else 1)
        bws[cls] = elems * dtype.itemsize / max(_timed(device, fn) - overhead, 1e-7)
    return bws


def _call_overhead(device: str, base: torch.dtype, adapter: torch.dtype) -> float:
    """Seconds of a forward + backward of a tiny layer: the Python / autograd path, not the kernels."""
    from .timing import pair_step

    with torch.random.fork_rng(devices=[]):
        step = pair_step(("fwd1", "bwd1"), 8, 8, 8, 2, dtype=base, adapter_dtype=adapter, device=device)
        return _timed(device, step, 40)


def calibrate(device: str = "cpu", base_dtype: str = "float32", adapter_dtype: str = "float32") -> CostModel:
    """Measure the rates of a :class:`CostModel` (about 0.1–0.3 s on a 2-core CPU).

    Args:
        device: ``"cpu"`` or ``"cuda"``.
        base_dtype: dtype name for the base products.
        adapter_dtype: dtype name for the adapter products.

    Returns:
        The fitted model (not cached; see :func:`get_model`).
    """
    from ..core.dropout import DropoutMask

    bd, ad = getattr(torch, base_dtype), getattr(torch, adapter_dtype)
    base_rate = _gemm_rate(device, bd)
    adapter_rate = base_rate if ad == bd else _gemm_rate(device, ad)
    tiny_a, tiny_b = _randn(8, 8, device=device, dtype=bd), _randn(8, 8, device=device, dtype=bd)
    overhead = _timed(device, lambda: tiny_a @ tiny_b, 20)
    skinny = _skinny_bandwidths(device, ad, overhead)
    big = _randn(2048, 1024, device=device, dtype=ad)
    elementwise = 2 * big.numel() * big.element_size() / _timed(device, big.clone)
    shape = (1024, 1024)
    target = _randn(*shape, device=device, dtype=ad)
    mask_s = _timed(device, lambda: DropoutMask(0.1, 1234).apply(target))
    return CostModel(
        device,
        base_dtype,
        adapter_dtype,
        base_rate,
        adapter_rate,
        skinny,
        elementwise,
        overhead,
        _call_overhead(device, bd, ad),
        mask_s / (shape[0] * shape[1]),
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
        seconds = _timed(device, lambda: F.dequantize_4bit(packed, state).to(getattr(torch, dtype)), 3)
        _dequant_costs[key] = seconds / w.numel()
    return _dequant_costs[key]


def _cache_key(device: str, base_dtype: str, adapter_dtype: str) -> str:
    threads = torch.get_num_threads() if device == "cpu" else torch.cuda.get_device_name()
    return f"v{_VERSION}|{device}|{base_dtype}|{adapter_dtype}|{torch.__version__}|{threads}|{os.cpu_count()}"


def _read_stored() -> dict:
    try:
        stored = json.loads((cache_dir() / _FILE).read_text())
        return stored if isinstance(stored, dict) else {}
    except (OSError, ValueError):
        return {}


def _calibrate_isolated(device: str, base_dtype: str, adapter_dtype: str) -> CostModel:
    """:func:`calibrate` in a fresh thread: grad mode, inference mode, autocast and saved-tensor hooks are
    per-thread, so the caller's state (say a ``no_grad`` generation or a SavedTensorRecorder) neither breaks the
    measurement nor records its tensors."""
    result: dict[str, object] = {}

    def work() -> None:
        try:
            result["model"] = calibrate(device, base_dtype, adapter_dtype)
        except BaseException as err:  # re-raised in the caller's thread
            result["error"] = err

    thread = threading.Thread(target=work, name="runlora-calibrate")
    thread.start()
    thread.join()
    if "error" in result:
        raise result["error"]  # type: ignore[misc]
    return result["model"]  # type: ignore[return-value]


_RATES = ("base_flops", "adapter_flops", "elementwise_bw")  # divisors: finite and > 0
_TIMES = ("overhead", "call_overhead", "mask_per_element")  # seconds: finite and >= 0
RECALIBRATE_HINT = "run `runlora-nb plan --recalibrate` (or runlora_nb.planning.costmodel.recalibrate())"


def _positive(v: object, allow_zero: bool = False) -> bool:
    ok = isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)
    return ok and (v >= 0 if allow_zero else v > 0)


def check_fields(fields: object, device: str, base_dtype: str, adapter_dtype: str) -> str | None:
    """What is wrong with a stored calibration (a dict of :class:`CostModel` fields), or None if it is usable."""
    if not isinstance(fields, dict):
        return f"expected a dict of CostModel fields, got {type(fields).__name__}"
    expected = set(CostModel.__dataclass_fields__)
    if set(fields) != expected:
        return f"fields {sorted(set(fields) ^ expected)} missing or unknown"
    if (fields["device"], fields["base_dtype"], fields["adapter_dtype"]) != (
        device,
        base_dtype,
        adapter_dtype,
    ):
        return "it was made for another device or dtype"
    for name in _RATES + _TIMES:
        if not _positive(fields[name], allow_zero=name in _TIMES):
            return f"{name}={fields[name]!r} (must be a finite number {'>= 0' if name in _TIMES else '> 0'})"
    bw = fields["skinny_bw"]
    if (
        not isinstance(bw, dict)
        or set(bw) != set(SKINNY_CLASSES)
        or not all(_positive(v) for v in bw.values())
    ):
        return f"skinny_bw={bw!r} (must give a finite bandwidth > 0 for each of {SKINNY_CLASSES})"
    return None


def default_model(device: str, base_dtype: str, adapter_dtype: str) -> CostModel:
    """Order-of-magnitude rates (a laptop CPU or a mid-range GPU), used when a calibration is unusable; the
    plans then stay valid and near the fewest-FLOP ones, only less tuned to this machine."""
    gpu = device != "cpu"
    bw = 1e12 if gpu else 1e10
    return CostModel(
        device, base_dtype, adapter_dtype, 5e13 if gpu else 5e10, 5e13 if gpu else 5e10,
        dict.fromkeys(SKINNY_CLASSES, bw), bw, 1e-5 if gpu else 5e-6, 2e-4 if gpu else 1e-4, 1e-11 if gpu else 1e-9,
    )  # fmt: skip


def _usable(fields: object, mkey: tuple[str, str, str], where: str) -> CostModel:
    problem = check_fields(fields, *mkey)
    if problem is None:
        return CostModel(**fields)  # type: ignore[arg-type]
    warnings.warn(
        f"costmodel: the {mkey[0]} {mkey[1]}/{mkey[2]} calibration {where} is unusable ({problem}); planning with "
        f"default rates for now. To measure this machine again, {RECALIBRATE_HINT}.",
        UserWarning,
        stacklevel=5,
    )
    return default_model(*mkey)


def get_model(device: str, base_dtype: str, adapter_dtype: str) -> CostModel:
    """The cost model for this device and dtypes: from memory, else the JSON cache, else calibrated now.

    A stored calibration with unusable values (zero, null or missing rates, say from a hand edit) is not used:
    the planner falls back to :func:`default_model` with a warning that names the command to recalibrate.
    """
    mkey = (device, base_dtype, adapter_dtype)
    model = _models.get(mkey)
    if model is not None:
        return model
    with _lock:
        if mkey in _models:
            return _models[mkey]
        stored = _read_stored()
        key = _cache_key(*mkey)
        if key in stored:
            model = _usable(stored[key], mkey, f"in {cache_dir() / _FILE}")
        else:
            model = _usable(asdict(_calibrate_isolated(*mkey)), mkey, "just measured")
            stored[key] = asdict(model)
            with contextlib.suppress(OSError):
                atomic_write_text(cache_dir() / _FILE, json.dumps(stored, indent=1, sort_keys=True))
        _models[mkey] = model
        return model


def recalibrate() -> None:
    """Forget every calibration (memory and disk); the next plan measures again."""
    with _lock:
        _models.clear()
        (cache_dir() / _FILE).unlink(missing_ok=True)
