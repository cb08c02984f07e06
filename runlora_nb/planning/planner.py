"""Choose the chain pair for a call: by FLOPs, by a calibrated cost model, or by timing.

Modes:
    ``"flops"``: fewest matmul FLOPs (the paper's criterion).
    ``"auto"``: least predicted time from a per-(device, dtype) cost model — GEMM time from a roofline of FLOP
        rate and memory bandwidth fitted on this machine in well under a second, plus the dequantization of a
        quantized base and the dropout mask work. Skinny rank-8..64 GEMMs are bandwidth bound, which FLOPs miss.
    ``"timed"``: run every valid pair in the real dtype and device and keep the fastest (≤ about 1 s a shape).

Plans are cached in memory per :class:`PlanKey` and, for ``"auto"`` and ``"timed"``, persisted as JSON under
the user cache dir, so later processes reuse them. A corrupt cache file is ignored and rewritten.
"""

from __future__ import annotations

import atexit
import contextlib
import importlib.metadata
import json
import statistics
import threading
import warnings
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Literal

import torch

from ..common.paths import atomic_write_text, cache_dir
from ..common.sysmem import check_fits
from ..core.chains import ALL, BACKWARD, FORWARD, Needs, pair_flops, pair_temp_bytes, valid_pairs
from . import costmodel
from .timing import interleaved, pair_step

__all__ = ["MODES", "ChainPlan", "PlanKey", "clear_cache", "flush", "plan_chains"]

Mode = Literal["flops", "auto", "timed"]
MODES: tuple[str, ...] = ("auto", "flops", "timed")
_CACHE_FILE = "plans.json"


def _package_version() -> str:
    try:
        return importlib.metadata.version("runlora_nb")
    except importlib.metadata.PackageNotFoundError:  # running from a source tree that was never installed
        return "unknown"


_RUNLORA_VERSION = _package_version()


@dataclass(frozen=True)
class PlanKey:
    """Everything a plan depends on."""

    n_tokens: int
    in_features: int
    out_features: int
    rank: int
    needs: Needs
    base_dtype: str
    adapter_dtype: str
    device: str
    dropout: bool
    quant: str  # "" for float bases, else "nf4" / "fp4" / "int8"
    mode: str
    torch_version: str = torch.__version__
    runlora_version: str = _RUNLORA_VERSION  # plans from another release are not reused

    def as_str(self) -> str:
        return "|".join(str(v) for v in asdict(self).values())


@dataclass(frozen=True)
class ChainPlan:
    """Which (forward, backward) pair a layer uses for one shape, and why.

    Attributes:
        fwd: forward chain id.
        bwd: backward chain id.
        mode: how it was chosen: ``"flops"``, ``"auto"``, ``"timed"`` or ``"explicit"``.
        flops: matmul FLOPs of one forward + backward with this pair.
        predicted_s: predicted (auto) or measured (timed) seconds of forward + backward; None for flops mode.
        temp_bytes: peak bytes of the chain temporaries.
        reason: one sentence a person can read.
    """

    fwd: str
    bwd: str
    mode: str
    flops: int
    predicted_s: float | None
    temp_bytes: int
    reason: str

    @property
    def pair(self) -> tuple[str, str]:
        return self.fwd, self.bwd

    def to_dict(self) -> dict[str, object]:
        """The plan as a JSON-ready dict (what a run's config records); :meth:`from_dict` reads it back."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, object]) -> ChainPlan:
        """Read a plan written by :meth:`to_dict` (e.g. from a run's config), checking every field.

        Args:
            data: a mapping with at least ``fwd`` and ``bwd``; the other fields default to a pinned plan's.

        Returns:
            The plan.

        Raises:
            TypeError: ``data`` is not a mapping, or a field has the wrong type.
            ValueError: unknown fields or chain ids.
        """
        if not isinstance(data, Mapping):
            raise TypeError(
                f"ChainPlan.from_dict: expected a dict from ChainPlan.to_dict(), got {type(data).__name__}"
            )
        unknown = set(data) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(
                f"ChainPlan.from_dict: unknown fields {sorted(unknown)}; expected {list(cls.__dataclass_fields__)}"
            )
        fwd, bwd = data.get("fwd"), data.get("bwd")
        if fwd not in FORWARD or bwd not in BACKWARD:
            raise ValueError(
                f"ChainPlan.from_dict: unknown chain pair ({fwd!r}, {bwd!r}); fwd must be one of {sorted(FORWARD)} "
                f"and bwd one of {sorted(BACKWARD)} (was the plan recorded by another runlora_nb version?)"
            )
        fields = {"mode": "explicit", "flops": 0, "predicted_s": None, "temp_bytes": 0, "reason": "pinned"}
        fields.update({k: v for k, v in data.items() if k not in ("fwd", "bwd")})
        types = {"mode": str, "flops": int, "temp_bytes": int, "reason": str}
        for name, typ in types.items():
            if not isinstance(fields[name], typ) or isinstance(fields[name], bool):
                raise TypeError(
                    f"ChainPlan.from_dict: field {name!r} must be {typ.__name__}, got {fields[name]!r}"
                )
        t = fields["predicted_s"]
        if t is not None and (isinstance(t, bool) or not isinstance(t, int | float)):
            raise TypeError(f"ChainPlan.from_dict: field 'predicted_s' must be a number or None, got {t!r}")
        return cls(fwd, bwd, **fields)  # type: ignore[arg-type]

    def __str__(self) -> str:
        t = "" if self.predicted_s is None else f", {self.predicted_s * 1e3:.3g} ms"
        return f"{self.fwd}+{self.bwd} [{self.mode}] {self.flops / 1e9:.3g} GFLOP{t}: {self.reason}"


_lock = threading.Lock()
# Plans of this process, oldest first (a hit does not reorder: the hit path stays one dict lookup). Bounded: a run
# with many distinct sequence lengths (one key
# per N) must not grow it without end.
MEMORY_PLANS = 4096
_memory: OrderedDict[PlanKey, ChainPlan] = OrderedDict()
_disk: dict[str, dict] | None = None
# New plans are written to plans.json off the layer call: in batches, by a timer thread, and at exit.
FLUSH_DELAY_S = 2.0
_dirty = False
_flush_timer: threading.Timer | None = None
_write_lock = threading.Lock()


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _load_disk() -> dict[str, dict]:
    global _disk
    if _disk is None:
        path = cache_dir() / _CACHE_FILE
        try:
            data = json.loads(path.read_text())
            _disk = data if isinstance(data, dict) else {}
        except (OSError, ValueError):
            _disk = {}  # missing or corrupt: start over, the next save rewrites it
    return _disk


def _save_disk(key: PlanKey, plan: ChainPlan) -> None:
    """Remember ``plan`` for the file (called under ``_lock``); a timer writes it within ``FLUSH_DELAY_S``."""
    global _dirty, _flush_timer
    _load_disk()[key.as_str()] = asdict(plan)
    _dirty = True
    if _flush_timer is None:
        _flush_timer = threading.Timer(FLUSH_DELAY_S, flush)
        _flush_timer.daemon = True
        _flush_timer.start()


def flush() -> None:
    """Write the plans made since the last write to ``plans.json`` (the timer and interpreter exit call it)."""
    global _dirty, _flush_timer
    # one writer at a time, snapshot and write together: a slower flush must not land an older snapshot over a
    # newer one (the timer and an explicit flush can run at once); planning itself only waits for the snapshot
    with _write_lock:
        with _lock:
            _flush_timer = None
            if not _dirty or _disk is None:
                return
            text = json.dumps(_disk, indent=0, sort_keys=True)
            _dirty = False
        with contextlib.suppress(OSError):  # a read-only cache dir only costs re-planning in the next process
            atomic_write_text(cache_dir() / _CACHE_FILE, text)


atexit.register(flush)


def _remember(key: PlanKey, plan: ChainPlan) -> None:
    _memory[key] = plan
    _memory.move_to_end(key)
    while len(_memory) > MEMORY_PLANS:
        _memory.popitem(last=False)


def _allow_merged(key: PlanKey) -> bool:
    base, adapter = getattr(torch, key.base_dtype), getattr(torch, key.adapter_dtype)
    return adapter.itemsize <= base.itemsize or not adapter.is_floating_point


def _pairs(key: PlanKey, dropout: float) -> list[tuple[str, str]]:
    """The candidate pairs for ``key``: adapters wider than the base rule out the merged chains and bring in
    the chains that run the rank-r path in the base dtype."""
    allow = _allow_merged(key)
    return list(valid_pairs(dropout, allow_merged=allow, mixed=not allow))


def _from_disk(key: PlanKey) -> ChainPlan | None:
    """The stored plan for ``key`` if it is one the planner could have made for it, else None (with a warning).

    A stored plan must parse, be a valid pair for the key (no merged chain with dropout or with adapters more
    precise than the base), carry the key's mode and the FLOPs of that pair on the key's shape.
    """
    raw = _load_disk().get(key.as_str())
    if raw is None:
        return None
    try:
        plan = ChainPlan.from_dict(raw)
    except (TypeError, ValueError) as err:
        problem = str(err)
    else:
        valid = set(_pairs(key, 0.1 if key.dropout else 0.0))
        shape = (key.n_tokens, key.in_features, key.out_features, key.rank, key.needs)
        if plan.pair not in valid:
            problem = f"pair {'+'.join(plan.pair)} is not valid for it (dropout={key.dropout})"
        elif plan.mode != key.mode:
            problem = f"it was made in mode {plan.mode!r}, not {key.mode!r}"
        elif plan.flops != pair_flops(*plan.pair, *shape):
            problem = f"its FLOPs {plan.flops} are not those of {'+'.join(plan.pair)} on this shape"
        else:
            return plan
    warnings.warn(
        f"planner: ignoring the entry for {key.as_str()!r} in {cache_dir() / _CACHE_FILE}: {problem}; "
        "planning again (delete the file to drop every stored plan)",
        UserWarning,
        stacklevel=4,
    )
    return None


def clear_cache(disk: bool = False) -> None:
    """Forget every in-memory plan, and the plans not yet written (and the JSON cache file when ``disk``).

    Waits for a write in progress and cancels the pending one, so no earlier plan lands in the file afterwards
    (a hand-edited file, or the cache of whatever ``RUNLORA_NB_CACHE`` names by then, stays as it is).
    """
    global _disk, _dirty, _flush_timer
    with _write_lock, _lock:
        if _flush_timer is not None:
            _flush_timer.cancel()
            _flush_timer = None
        _dirty = False
        _memory.clear()
        if disk:
            (cache_dir() / _CACHE_FILE).unlink(missing_ok=True)
            _disk = None


def _by_flops(key: PlanKey, pairs: list[tuple[str, str]], itemsize: int) -> ChainPlan:
    n, i, o, r, needs = key.n_tokens, key.in_features, key.out_features, key.rank, key.needs
    # ties: fewer temporary bytes, then table order
    best = min(
        pairs, key=lambda p: (pair_flops(*p, n, i, o, r, needs), pair_temp_bytes(*p, n, i, o, r, needs))
    )
    flops = pair_flops(*best, n, i, o, r, needs)
    worst = max(pair_flops(*p, n, i, o, r, needs) for p in pairs)
    reason = (
        f"fewest FLOPs among {len(pairs)} valid pairs ({flops / 1e9:.3g} vs up to {worst / 1e9:.3g} GFLOP)"
    )
    return ChainPlan(*best, "flops", flops, None, pair_temp_bytes(*best, n, i, o, r, needs, itemsize), reason)


def _by_model(key: PlanKey, pairs: list[tuple[str, str]], itemsize: int) -> ChainPlan:
    n, i, o, r, needs = key.n_tokens, key.in_features, key.out_features, key.rank, key.needs
    model = costmodel.get_model(key.device, key.base_dtype, key.adapter_dtype)
    times = {p: model.pair_seconds(*p, n, i, o, r, needs, key.dropout, key.quant) for p in pairs}
    best = min(pairs, key=lambda p: (times[p], pair_temp_bytes(*p, n, i, o, r, needs)))
    by_flops = _by_flops(key, pairs, itemsize)
    if best == by_flops.pair:
        reason = f"least predicted time ({model.describe()}), also fewest FLOPs"
    else:
        gain = times[by_flops.pair] / times[best]
        reason = (
            f"least predicted time ({model.describe()}); the fewest-FLOP pair {'+'.join(by_flops.pair)} is "
            f"predicted {gain:.2f}× slower because its extra traffic outweighs the FLOPs it saves"
        )
    flops = pair_flops(*best, n, i, o, r, needs)
    return ChainPlan(
        *best, "auto", flops, times[best], pair_temp_bytes(*best, n, i, o, r, needs, itemsize), reason
    )


def time_pairs(
    key: PlanKey, pairs: list[tuple[str, str]], budget_s: float = 1.0
) -> dict[tuple[str, str], float]:
    """Median seconds of forward + backward for each pair on the key's shape, dtype and device.

    To stay near ``budget_s`` on slow machines, pairs the cost model predicts > 1.3× slower than its best are
    not run (they get their predicted time), and the number of rounds shrinks with the predicted step time.

    Args:
        key: the plan key (shape, needs, dtypes, device, dropout).
        pairs: valid pairs.
        budget_s: soft limit for the timed rounds.

    Returns:
        pair → seconds (measured median, or the model's prediction for pruned pairs).
    """
    model = costmodel.get_model(key.device, key.base_dtype, key.adapter_dtype)
    shape = (key.n_tokens, key.in_features, key.out_features, key.rank)
    predicted = {p: model.pair_seconds(*p, *shape, key.needs, key.dropout, key.quant) for p in pairs}
    best = min(predicted.values())
    keep = sorted((p for p in pairs if predicted[p] <= 1.3 * best), key=predicted.get)[:4]
    per_round = sum(predicted[p] for p in keep)
    reps = int(max(1, min(5, budget_s / max(per_round, 1e-9) - 1)))
    dtype, adapter = getattr(torch, key.base_dtype), getattr(torch, key.adapter_dtype)
    n, i, o, _ = shape
    per_pair = dtype.itemsize * (2 * n * i + i * o + 3 * n * o) + 4 * max(n * i, n * o, i * o)
    check_fits(
        len(keep) * per_pair,
        f"planner (mode 'timed'): timing {len(keep)} chain pairs on N={n} {i}→{o}",
        "plan with mode='flops' or 'auto' (formulas, no tensors) or use a smaller shape",
        key.device,
    )
    steps = {
        "+".join(p): pair_step(
            p,
            *shape,
            needs=key.needs,
            dtype=dtype,
            adapter_dtype=adapter,
            device=key.device,
            dropout=0.1 if key.dropout else 0.0,
        )
        for p in keep
    }
    with torch.random.fork_rng(devices=[]):  # dropout seeds drawn while timing must not move the user's RNG
        measured = interleaved(steps, warmup=1, reps=reps, budget_s=budget_s, device=key.device)
    result = dict(predicted)
    for p in keep:
        result[p] = statistics.median(measured["+".join(p)])
    return result


def _by_timing(key: PlanKey, pairs: list[tuple[str, str]], itemsize: int) -> ChainPlan:
    n, i, o, r, needs = key.n_tokens, key.in_features, key.out_features, key.rank, key.needs
    times = time_pairs(key, pairs)
    best = min(pairs, key=lambda p: times[p])
    runner_up = sorted(times.values())[1] if len(times) > 1 else times[best]
    reason = f"fastest of {len(pairs)} valid pairs timed jointly here ({runner_up / times[best]:.2f}× ahead of the next)"
    flops = pair_flops(*best, n, i, o, r, needs)
    return ChainPlan(
        *best, "timed", flops, times[best], pair_temp_bytes(*best, n, i, o, r, needs, itemsize), reason
    )


def plan_chains(
    n_tokens: int,
    in_features: int,
    out_features: int,
    rank: int,
    *,
    needs: Needs | tuple[bool, bool, bool] = ALL,
    dtype: torch.dtype = torch.float32,
    adapter_dtype: torch.dtype | None = None,
    device: torch.device | str = "cpu",
    dropout: float = 0.0,
    quant: str = "",
    mode: Mode = "auto",
) -> ChainPlan:
    """The chain pair to use for one call shape.

    Args:
        n_tokens: N, rows of the flattened input.
        in_features: i.
        out_features: o.
        rank: r.
        needs: which of (dX, dA, dB) backward must produce.
        dtype: dtype of the base products.
        adapter_dtype: dtype of the adapter products (default: ``dtype``). Merged chains are not considered
            when the adapters are more precise than the base, since ``W + sAB`` would round sAB to ``dtype``.
        device: where the call runs.
        dropout: adapter dropout probability (> 0 rules out merged chains).
        quant: ``""`` for a float base, else ``"nf4"``, ``"fp4"`` or ``"int8"`` (dequantization is costed).
        mode: ``"auto"``, ``"flops"`` or ``"timed"``.

    Returns:
        A :class:`ChainPlan`; never a merged chain with dropout.

    Raises:
        ValueError: unknown mode or non-positive sizes.
    """
    if mode not in MODES:
        raise ValueError(f"plan_chains: mode must be one of {MODES}, got {mode!r}")
    if min(in_features, out_features, rank) <= 0 or n_tokens < 0:
        raise ValueError(
            f"plan_chains: sizes must be positive, got N={n_tokens}, i={in_features}, o={out_features}, r={rank}"
        )
    adapter_dtype = adapter_dtype or dtype
    key = PlanKey(
        n_tokens,
        in_features,
        out_features,
        rank,
        Needs(*needs),
        _dtype_name(dtype),
        _dtype_name(adapter_dtype),
        torch.device(device).type,
        dropout > 0,
        quant,
        mode,
    )
    plan = _memory.get(key)
    if plan is not None:
        return plan
    with _lock:
        plan = _memory.get(key) or (_from_disk(key) if mode != "flops" else None)
        if plan is None:
            pairs = _pairs(key, dropout)
            choose = {"flops": _by_flops, "auto": _by_model, "timed": _by_timing}[mode]
            plan = choose(key, pairs, dtype.itemsize)
            if mode != "flops":
                _save_disk(key, plan)
        _remember(key, plan)
    return plan
