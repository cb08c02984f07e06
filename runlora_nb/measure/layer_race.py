"""Race one layer: every valid chain pair, the planner's choice, a twin, PEFT and the frozen floor, honestly.

Rules (the project's): candidates are interleaved round by round after a warm-up, medians and IQRs are quoted,
results are ratios to the frozen ``nn.Linear`` (the floor: forward + dX of a frozen layer) and to PEFT, and
activation memory is counted exactly with ``saved_tensors_hooks`` (plus the allocator's peak on CUDA).

Results are tidy pandas DataFrames. A callback gets a :class:`Measurement` after every round, so a panel can
draw bars as they land; a cancel callback stops the race between two calls and returns what was measured.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field

import pandas as pd
import torch
from torch import nn

from ..common.sysmem import check_fits
from ..core.chains import Needs, pair_flops, valid_pairs
from ..core.memory import SavedTensorRecorder
from ..nn.layer import RunLoRALinear
from ..planning.costmodel import get_model
from ..planning.timing import Cancelled, interleaved
from .spec import LAYER_COLUMNS, LayerSpec, Measurement

__all__ = [
    "Candidate",
    "make_base",
    "measurement_of",
    "peft_layer",
    "race_bytes",
    "race_layer",
    "runlora_layer",
    "timing_notes",
    "twin_names",
]

PREDICTION_LIMIT = 10.0  # measured / predicted median beyond ×10 (or below ×0.1): the machine, not the model
TWIN_SPREAD_LIMIT = 0.25  # the same layer timed twice differing by more than 25%: noisy measurements


@dataclass
class Candidate:
    name: str
    kind: str
    module: nn.Module
    fwd: str = ""
    bwd: str = ""
    flops: int = 0
    predicted_s: float | None = None
    saved_bytes: int = 0
    peak_bytes: int | None = None
    params: list[nn.Parameter] = field(default_factory=list)


def make_base(spec: LayerSpec, seed: int = 0) -> nn.Module:
    """The frozen base layer: nn.Linear, or a bitsandbytes layer for quantized specs."""
    gen = torch.Generator().manual_seed(seed)
    i, o = spec.in_features, spec.out_features
    weight = torch.randn(o, i, generator=gen) / math.sqrt(i)
    bias = torch.randn(o, generator=gen) * 0.1 if spec.bias else None
    if not spec.quant:
        lin = nn.Linear(i, o, bias=spec.bias)
        with torch.no_grad():
            lin.weight.copy_(weight)
            if bias is not None:
                lin.bias.copy_(bias)
        return lin.to(device=spec.device, dtype=spec.torch_dtype).requires_grad_(False)
    from ..core.quant import quantized_linear

    return quantized_linear(weight, bias, spec.quant, compute_dtype=spec.torch_dtype, device=spec.device)


def peft_layer(base: nn.Module, spec: LayerSpec) -> nn.Module:
    import peft

    from ..integrations.inject import get_peft_model

    holder = nn.Sequential(copy.deepcopy(base) if not spec.quant else base)
    cfg = peft.LoraConfig(
        r=spec.rank, lora_alpha=2 * spec.rank, lora_dropout=spec.dropout, target_modules=["0"]
    )
    model = get_peft_model(holder, cfg, autocast_adapter_dtype=spec.adapter_dtype is not None)
    layer = model.base_model.model[0]
    for mod in (layer.lora_A["default"], layer.lora_B["default"]):
        mod.to(spec.torch_adapter_dtype)
    _random_b(layer.lora_B["default"].weight)
    return model.train()


def _random_b(weight: torch.Tensor) -> None:
    """B = 0 at init makes some products trivially cheap on some backends; race with a non-zero B."""
    with torch.no_grad():
        weight.copy_(torch.randn(weight.shape, generator=torch.Generator().manual_seed(1)) * 0.01)


def runlora_layer(base: nn.Module, spec: LayerSpec, chain) -> RunLoRALinear:
    layer = RunLoRALinear(
        base,
        r=spec.rank,
        alpha=2 * spec.rank,
        dropout=spec.dropout,
        chain=chain,
        adapter_dtype=spec.torch_adapter_dtype,
    ).train()
    _random_b(layer.lora_B.weight)
    return layer


def race_bytes(spec: LayerSpec, include_peft: bool = True) -> int:
    """Estimated peak bytes of a layer race, counted before anything is allocated.

    The base weight (built in fp32 first) and PEFT's copy of it, the input, its gradient, the output and its
    gradient, the dropout mask, a merged weight, and the fp32 staging of the random data.

    Args:
        spec: the layer.
        include_peft: PEFT's copy of the base weight is counted.

    Returns:
        Bytes (an estimate, on the generous side).
    """
    n, i, o, _ = spec.shape
    item = spec.torch_dtype.itemsize
    weights = i * o * (item * (2 + (include_peft and not spec.quant)) + 4)
    activations = item * (n * i * (2 + (spec.dropout > 0)) + 2 * n * o) + 4 * max(n * i, n * o)
    return weights + activations


def twin_names(twins: int) -> list[str]:
    """Names of the twin candidates: ``"twin"``, ``"twin 2"``, …"""
    return ["twin" if k == 0 else f"twin {k + 1}" for k in range(twins)]


def _candidates(
    spec: LayerSpec, include_pairs: bool, include_peft: bool, twins: int = 1, include_frozen: bool = True
) -> list[Candidate]:
    n, i, o, r = spec.shape
    needs = Needs(spec.x_requires_grad, True, True)
    base = make_base(spec)
    bd, ad = spec.dtype, (spec.adapter_dtype or spec.dtype)
    model = get_model(torch.device(spec.device).type, bd, ad)
    floor_flops = 2 * n * i * o * (2 if spec.x_requires_grad else 1)
    cands = [Candidate("frozen", "floor", base, flops=floor_flops)] if include_frozen else []
    if include_peft:
        peft_flops = pair_flops("fwd1", "bwd1", n, i, o, r, needs) - 2 * n * i * r  # PEFT keeps XA
        cands.append(Candidate("peft", "peft", peft_layer(base, spec), "fwd1", "bwd1", peft_flops))
    plan_layer = runlora_layer(base, spec, spec.mode)
    plan = plan_layer.plan(n, needs)
    predicted = _predict(model, plan.pair, spec)
    cands.append(Candidate("runlora", "plan", plan_layer, plan.fwd, plan.bwd, plan.flops, predicted))
    # the twins: the very same layer timed again in every round, so the charts show the noise floor
    for name in twin_names(twins):
        cands.append(Candidate(name, "twin", plan_layer, plan.fwd, plan.bwd, plan.flops, predicted))
    if include_pairs:
        allow_merged = spec.torch_adapter_dtype.itemsize <= spec.torch_dtype.itemsize
        for pair in valid_pairs(spec.dropout, allow_merged=allow_merged, mixed=not allow_merged):
            cands.append(
                Candidate(
                    "+".join(pair),
                    "pair",
                    runlora_layer(base, spec, pair),
                    *pair,
                    pair_flops(*pair, n, i, o, r, needs),
                    _predict(model, pair, spec),
                )
            )
    for c in cands:
        c.params = [p for p in c.module.parameters() if p.requires_grad]
    return cands


def _predict(model, pair, spec: LayerSpec) -> float:
    needs = Needs(spec.x_requires_grad, True, True)
    return model.pair_seconds(*pair, *spec.shape, needs, spec.dropout > 0, spec.quant)


def _step_fn(c: Candidate, x: torch.Tensor, dy: torch.Tensor) -> Callable[[], None]:
    module, params = c.module, c.params

    def step() -> None:
        y = module(x)
        if y.requires_grad:  # the frozen floor with an input that needs no gradient has no backward
            y.backward(dy)
        x.grad = None
        for p in params:
            p.grad = None

    return step


def _measure_memory(c: Candidate, x: torch.Tensor, dy: torch.Tensor, device: str) -> None:
    with SavedTensorRecorder(c.module) as rec:
        y = c.module(x)
    c.saved_bytes = rec.activation_bytes()
    if y.requires_grad:
        y.backward(dy)
    del y
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        start = torch.cuda.memory_allocated()
        _step_fn(c, x, dy)()
        torch.cuda.synchronize()
        c.peak_bytes = torch.cuda.max_memory_allocated() - start


def race_layer(
    spec: LayerSpec = LayerSpec(),  # noqa: B008 (a frozen dataclass)
    *,
    reps: int = 7,
    warmup: int = 1,
    include_pairs: bool = True,
    include_peft: bool = True,
    twins: int = 1,
    noise_check: bool = False,
    on_measurement: Callable[[Measurement], None] | None = None,
    on_round: Callable[[int], None] | None = None,
    cancel: Callable[[], bool] | None = None,
    shuffle_seed: int | None = 0,
) -> pd.DataFrame:
    """Time forward + backward of every candidate for one layer, interleaved in a shuffled order each round.

    Candidates: the frozen layer (the floor), PEFT's LoRA layer, the planner's choice (``"runlora"``, a
    ``RunLoRALinear`` with ``chain=spec.mode``), its twin(s) (the same layer timed again: the noise floor)
    and, if ``include_pairs``, a ``RunLoRALinear`` fixed to each valid chain pair. A noise check races only
    the planner's layer and its twins: every candidate is the same layer, so any spread is the machine's.

    Args:
        spec: shape and setting.
        reps: timed rounds (each round runs every candidate once).
        warmup: untimed rounds first.
        include_pairs: race every valid pair too.
        include_peft: race PEFT too (needs the ``peft`` package).
        twins: copies of the planner's candidate (``"twin"``, ``"twin 2"``, …); 0 for none.
        noise_check: race only ``"runlora"`` and its twins (at least 3); no frozen, PEFT or pair candidates.
        on_measurement: called with a :class:`Measurement` per candidate after each round (final=True in the
            last one).
        on_round: called with the round index after that round's measurements were delivered and before the
            next round starts (outside every timing): the place for a chart to draw and wait for its front end.
        shuffle_seed: seed of the per-round candidate order (see :func:`~runlora_nb.planning.timing.interleaved`).
        cancel: polled between calls; when it returns True the race stops and the rounds done so far are
            returned, with ``df.attrs["cancelled"] = True``.

    Returns:
        A DataFrame with :data:`LAYER_COLUMNS`, one row per candidate, sorted by median time.
    """
    if twins < 0:
        raise ValueError(f"race_layer: twins must be ≥ 0, got {twins}")
    if reps < 1 or warmup < 0:
        raise ValueError(f"race_layer: reps must be >= 1 and warmup >= 0, got reps={reps}, warmup={warmup}")
    check_fits(
        race_bytes(spec, include_peft and not noise_check),
        f"race_layer: the layer race on {spec.label()}",
        "use fewer tokens (--tokens) or smaller in/out features (--in/--out)",
        spec.device,
    )
    if noise_check:
        cands = _candidates(spec, False, False, twins=max(twins, 3), include_frozen=False)
    else:
        cands = _candidates(spec, include_pairs, include_peft, twins=twins)
    gen = torch.Generator().manual_seed(2)
    n, i, o, _ = spec.shape
    x_dtype = spec.torch_dtype
    x = (
        torch.randn(n, i, generator=gen)
        .to(device=spec.device, dtype=x_dtype)
        .requires_grad_(spec.x_requires_grad)
    )
    dy = torch.randn(n, o, generator=gen).to(device=spec.device, dtype=x_dtype)
    for c in cands:
        _measure_memory(c, x, dy, spec.device)
    steps = {c.name: _step_fn(c, x, dy) for c in cands}
    by_name = {c.name: c for c in cands}

    def emit(k: int, samples: dict[str, list[float]]) -> None:
        if on_measurement is None:
            return
        for name, ts in samples.items():
            on_measurement(measurement_of(by_name[name], ts, final=(k == reps - 1)))

    cancelled = False
    collected: dict[str, list[float]] = {c.name: [] for c in cands}

    def keep(k: int, samples: dict[str, list[float]]) -> None:
        for name, ts in samples.items():
            collected[name] = list(ts)
        emit(k, samples)
        if on_round is not None:
            on_round(k)

    try:
        with torch.random.fork_rng(devices=[]):
            interleaved(
                steps,
                warmup=warmup,
                reps=reps,
                device=spec.device,
                cancel=cancel,
                on_round=keep,
                shuffle_seed=shuffle_seed,
            )
    except Cancelled:
        cancelled = True
    df = _frame(spec, [measurement_of(by_name[name], ts, final=True) for name, ts in collected.items() if ts])
    df.attrs["cancelled"] = cancelled
    df.attrs["spec"] = asdict(spec)
    df.attrs["notes"] = timing_notes(df)
    return df


def timing_notes(df: pd.DataFrame) -> list[str]:
    """Warnings about a race's measurements themselves: empty when they look sound.

    Two checks: the median of measured / predicted over the candidates with a cost-model prediction beyond
    ×10 or below ×0.1 (the machine is not behaving like the calibrated one: other processes, OpenMP
    oversubscription), and the twin spread (the planner's layer against its twins, the same module timed again
    each round, as max/min − 1) above 25%.

    Args:
        df: a :func:`race_layer` table (``kind``, ``median_s``, ``predicted_s`` columns).

    Returns:
        Human-readable notes naming the likely causes and the fix.
    """
    import os

    notes: list[str] = []
    if df.empty:
        return notes
    cores = os.cpu_count() or 1
    fix = (
        f"likely causes: other busy processes, or OpenMP oversubscription (more threads than free cores; "
        f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}); fix: close the other jobs or set "
        f"OMP_NUM_THREADS={cores} (or fewer if the machine is shared) and rerun"
    )
    pred = df[df.predicted_s.notna() & df.median_s.notna()]
    pred = pred[pred.predicted_s.astype(float) > 0]
    if len(pred):
        ratio = float((pred.median_s / pred.predicted_s.astype(float)).median())
        if ratio > PREDICTION_LIMIT or ratio < 1 / PREDICTION_LIMIT:
            notes.append(
                f"measured times are {ratio:.3g}× the cost model's prediction (median over {len(pred)} "
                f"candidates; expected within ×{1 / PREDICTION_LIMIT:g}–×{PREDICTION_LIMIT:g}); {fix}"
            )
    same = df[df.kind.isin(["plan", "twin"]) & df.median_s.notna()]
    if len(same) >= 2 and float(same.median_s.min()) > 0:
        spread = float(same.median_s.max() / same.median_s.min()) - 1
        if spread > TWIN_SPREAD_LIMIT:
            notes.append(
                f"twin spread {spread:.0%}: the same layer timed in the same rounds differs by more than "
                f"{TWIN_SPREAD_LIMIT:.0%}, so differences between candidates below that are noise; {fix}"
            )
    return notes


def measurement_of(c: Candidate, samples: Iterable[float], final: bool) -> Measurement:
    return Measurement(
        c.name,
        c.kind,
        c.fwd,
        c.bwd,
        tuple(samples),
        c.saved_bytes,
        c.peak_bytes,
        c.flops,
        c.predicted_s,
        final,
    )


def _frame(spec: LayerSpec, ms: list[Measurement]) -> pd.DataFrame:
    med = {m.candidate: m.median for m in ms}
    frozen, peft = med.get("frozen", math.nan), med.get("peft", math.nan)
    x_bytes = spec.tokens * spec.in_features * spec.torch_dtype.itemsize
    rows = [
        {
            "candidate": m.candidate,
            "kind": m.kind,
            "fwd": m.fwd,
            "bwd": m.bwd,
            "median_s": m.median,
            "iqr_s": m.iqr,
            "ratio_frozen": m.median / frozen,
            "ratio_peft": m.median / peft,
            "saved_bytes": m.saved_bytes,
            "saved_over_x": m.saved_bytes / x_bytes,
            "peak_bytes": m.peak_bytes,
            "flops": m.flops,
            "predicted_s": m.predicted_s,
            "reps": len(m.samples),
            "tokens": spec.tokens,
            "in_features": spec.in_features,
            "out_features": spec.out_features,
            "rank": spec.rank,
            "dtype": spec.dtype,
            "dropout": spec.dropout,
            "quant": spec.quant,
            "device": spec.device,
        }
        for m in ms
    ]
    df = pd.DataFrame(rows, columns=LAYER_COLUMNS)
    return df.sort_values("median_s", kind="stable").reset_index(drop=True)
