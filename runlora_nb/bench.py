"""Measurement engine: race chain pairs, PEFT and the frozen floor, honestly, and show what autograd keeps.

Rules (the project's): candidates are interleaved round by round after a warm-up, medians and IQRs are quoted,
results are ratios to the frozen ``nn.Linear`` (the floor: forward + dX of a frozen layer) and to PEFT, and
activation memory is counted exactly with ``saved_tensors_hooks`` (plus the allocator's peak on CUDA).

Results are tidy pandas DataFrames. A callback gets a :class:`Measurement` after every round, so a panel can
draw bars as they land; a cancel callback stops the race between two calls and returns what was measured.
"""

from __future__ import annotations

import copy
import math
import statistics
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field

import pandas as pd
import torch
from torch import nn

from .chains import Needs, pair_flops, valid_pairs
from .costmodel import get_model
from .layer import RunLoRALinear
from .memory import SavedTensorRecorder
from .timing import Cancelled, interleaved

__all__ = [
    "DTYPES",
    "GRID",
    "LAYER_COLUMNS",
    "SPEC_COLUMNS",
    "LayerSpec",
    "Measurement",
    "ModelRace",
    "check_targets",
    "compare_saved_tensors",
    "dtype_name",
    "estimate_memory",
    "geomean",
    "grid_specs",
    "layer_saved_tensors",
    "race_grid",
    "race_layer",
    "race_model",
    "saved_tensors_report",
]

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


@dataclass
class _Candidate:
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


def _make_base(spec: LayerSpec, seed: int = 0) -> nn.Module:
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
    from .quant import quantized_linear

    return quantized_linear(weight, bias, spec.quant, compute_dtype=spec.torch_dtype, device=spec.device)


def _peft_module(base: nn.Module, spec: LayerSpec) -> nn.Module:
    import peft

    from .inject import get_peft_model

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


def _runlora(base: nn.Module, spec: LayerSpec, chain) -> RunLoRALinear:
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


def _candidates(spec: LayerSpec, include_pairs: bool, include_peft: bool) -> list[_Candidate]:
    n, i, o, r = spec.shape
    needs = Needs(spec.x_requires_grad, True, True)
    base = _make_base(spec)
    bd, ad = spec.dtype, (spec.adapter_dtype or spec.dtype)
    model = get_model(torch.device(spec.device).type, bd, ad)
    floor_flops = 2 * n * i * o * (2 if spec.x_requires_grad else 1)
    cands = [_Candidate("frozen", "floor", base, flops=floor_flops)]
    if include_peft:
        peft_flops = pair_flops("fwd1", "bwd1", n, i, o, r, needs) - 2 * n * i * r  # PEFT keeps XA
        cands.append(_Candidate("peft", "peft", _peft_module(base, spec), "fwd1", "bwd1", peft_flops))
    plan_layer = _runlora(base, spec, spec.mode)
    plan = plan_layer.plan(n, needs)
    cands.append(
        _Candidate(
            "runlora", "plan", plan_layer, plan.fwd, plan.bwd, plan.flops, _predict(model, plan.pair, spec)
        )
    )
    if include_pairs:
        allow_merged = spec.torch_adapter_dtype.itemsize <= spec.torch_dtype.itemsize
        for pair in valid_pairs(spec.dropout, allow_merged=allow_merged):
            cands.append(
                _Candidate(
                    "+".join(pair),
                    "pair",
                    _runlora(base, spec, pair),
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


def _step_fn(c: _Candidate, x: torch.Tensor, dy: torch.Tensor) -> Callable[[], None]:
    module, params = c.module, c.params

    def step() -> None:
        y = module(x)
        if y.requires_grad:  # the frozen floor with an input that needs no gradient has no backward
            y.backward(dy)
        x.grad = None
        for p in params:
            p.grad = None

    return step


def _measure_memory(c: _Candidate, x: torch.Tensor, dy: torch.Tensor, device: str) -> None:
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
    spec: LayerSpec = LayerSpec(),
    *,
    reps: int = 7,
    warmup: int = 1,
    include_pairs: bool = True,
    include_peft: bool = True,
    on_measurement: Callable[[Measurement], None] | None = None,
    cancel: Callable[[], bool] | None = None,
) -> pd.DataFrame:
    """Time forward + backward of every candidate for one layer, interleaved.

    Candidates: the frozen layer (the floor), PEFT's LoRA layer, the planner's choice (``"runlora"``, a
    ``RunLoRALinear`` with ``chain=spec.mode``) and, if ``include_pairs``, a ``RunLoRALinear`` fixed to each
    valid chain pair.

    Args:
        spec: shape and setting.
        reps: timed rounds (each round runs every candidate once).
        warmup: untimed rounds first.
        include_pairs: race every valid pair too.
        include_peft: race PEFT too (needs the ``peft`` package).
        on_measurement: called with a :class:`Measurement` per candidate after each round (final=True in the
            last one).
        cancel: polled between calls; when it returns True the race stops and the rounds done so far are
            returned, with ``df.attrs["cancelled"] = True``.

    Returns:
        A DataFrame with :data:`LAYER_COLUMNS`, one row per candidate, sorted by median time.
    """
    cands = _candidates(spec, include_pairs, include_peft)
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
            on_measurement(_measurement(by_name[name], ts, final=(k == reps - 1)))

    cancelled = False
    collected: dict[str, list[float]] = {c.name: [] for c in cands}

    def keep(k: int, samples: dict[str, list[float]]) -> None:
        for name, ts in samples.items():
            collected[name] = list(ts)
        emit(k, samples)

    try:
        with torch.random.fork_rng(devices=[]):
            interleaved(steps, warmup=warmup, reps=reps, device=spec.device, cancel=cancel, on_round=keep)
    except Cancelled:
        cancelled = True
    df = _frame(spec, [_measurement(by_name[name], ts, final=True) for name, ts in collected.items() if ts])
    df.attrs["cancelled"] = cancelled
    df.attrs["spec"] = asdict(spec)
    return df


def _measurement(c: _Candidate, samples: Iterable[float], final: bool) -> Measurement:
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


def race_grid(
    specs: Iterable[LayerSpec],
    *,
    reps: int = 7,
    warmup: int = 1,
    on_measurement: Callable[[Measurement], None] | None = None,
    cancel: Callable[[], bool] | None = None,
    progress: Callable[[int, LayerSpec], None] | None = None,
) -> pd.DataFrame:
    """:func:`race_layer` over several specs, concatenated (stops early if cancelled)."""
    frames = []
    for k, spec in enumerate(specs):
        if progress is not None:
            progress(k, spec)
        df = race_layer(spec, reps=reps, warmup=warmup, on_measurement=on_measurement, cancel=cancel)
        frames.append(df)
        if df.attrs.get("cancelled"):
            break
    out = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=LAYER_COLUMNS)
    out.attrs["cancelled"] = bool(frames and frames[-1].attrs.get("cancelled"))
    return out


def grid_specs(dtypes=("float32", "bfloat16"), dropouts=(0.0, 0.1), shapes=GRID, **kw) -> list[LayerSpec]:
    """The issue-3 grid as LayerSpecs (every shape × dtype × dropout)."""
    return [
        LayerSpec(n, i, o, r, dtype=dt, dropout=p, **kw)
        for (n, i, o, r) in shapes
        for dt in dtypes
        for p in dropouts
    ]


def check_targets(df: pd.DataFrame) -> pd.DataFrame:
    """One row per spec of a grid race with the issue-3 targets checked.

    Columns: the spec, plan pair, plan/frozen, plan/PEFT, best pair, pair/best (the planner's pair as measured
    by its own pair candidate, against the fastest pair), twin spread (the planner's candidate against that
    twin: the same layer measured twice, i.e. the noise floor), saved/X, and booleans ``ok_frozen`` (≤ 1.10 at
    p=0, ≤ 1.15 at p>0), ``ok_peft`` (not slower than PEFT by > 3%), ``ok_best`` (the planner's pair within 5%
    of the fastest pair), ``ok_saved`` (≤ 1.07 × bytes(X)).
    """
    keys = list(SPEC_COLUMNS)
    rows = []
    for spec_vals, g in df.groupby(keys, sort=False, dropna=False):  # quant "" reads back from CSV as NaN
        plan = g[g.kind == "plan"].iloc[0]
        pairs = g[g.kind == "pair"]
        twin = pairs[(pairs.fwd == plan.fwd) & (pairs.bwd == plan.bwd)]
        if twin.empty:  # raced without the pairs: the planner's candidate is all there is
            pairs, twin = g[g.kind == "plan"], g[g.kind == "plan"]
        best = pairs.loc[pairs.median_s.idxmin()]
        mine = twin.median_s.iloc[0]
        limit = 1.10 if plan.dropout == 0 else 1.15
        rows.append(
            {
                **dict(zip(keys, spec_vals)),
                "plan": f"{plan.fwd}+{plan.bwd}",
                "plan_over_frozen": plan.ratio_frozen,
                "plan_over_peft": plan.ratio_peft,
                "best_pair": f"{best.fwd}+{best.bwd}",
                "pair_over_best": mine / best.median_s,
                "twin_spread": plan.median_s / mine,
                "saved_over_x": plan.saved_over_x,
                "peft_saved_over_x": g[g.kind == "peft"].saved_over_x.iloc[0]
                if (g.kind == "peft").any()
                else math.nan,
                "ok_frozen": plan.ratio_frozen <= limit,
                "ok_peft": plan.ratio_peft <= 1.03,
                "ok_best": mine <= 1.05 * best.median_s,
                "ok_saved": plan.saved_over_x <= 1.07,
            }
        )
    return pd.DataFrame(rows)


def geomean(values: Iterable[float]) -> float:
    vals = [v for v in values if v > 0 and not math.isnan(v)]
    return math.exp(sum(math.log(v) for v in vals) / len(vals)) if vals else math.nan


# ==============================================================================================================
# whole models


@dataclass
class ModelRace:
    """Result of :func:`race_model`.

    Attributes:
        times: one row per candidate ("no adapters", "peft", "runlora"): median_s, iqr_s, ratio_base,
            ratio_peft, saved_bytes, saved_over_peft, tokens_per_s, reps, and the setting.
        plans: the runlora model's per-module chain plans (see :func:`runlora_nb.train.plan_table`).
    """

    times: pd.DataFrame
    plans: pd.DataFrame


MODEL_COLUMNS = [
    "candidate",
    "median_s",
    "iqr_s",
    "ratio_base",
    "ratio_peft",
    "saved_bytes",
    "saved_over_peft",
    "tokens_per_s",
    "reps",
    "model",
    "batch",
    "seq",
    "rank",
    "dropout",
    "dtype",
]


def _load(model: str | nn.Module, dtype: str) -> nn.Module:
    if isinstance(model, nn.Module):
        return model
    from .zoo import load_model

    loaded, _ = load_model(model, dtype=dtype)
    return loaded


def random_batch(model: nn.Module, batch: int, seq: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """Token ids (batch, seq) drawn from the model's vocabulary, with labels = input_ids."""
    vocab = int(getattr(getattr(model, "config", None), "vocab_size", 256))
    ids = torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(seed))
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}


def adapter_variants(
    model: nn.Module,
    *,
    r: int,
    alpha: float,
    dropout: float,
    target_modules,
    mode: str = "auto",
    backends: tuple[str, ...] = ("base", "peft", "runlora"),
) -> dict[str, nn.Module]:
    """Independent copies of ``model``: frozen without adapters ("base", inputs require grad so backward
    reaches every layer, the floor of any LoRA step), with PEFT LoRA, and with RunLoRA — same init seed."""
    import peft

    from .inject import apply_runlora, get_peft_model

    out: dict[str, nn.Module] = {}
    for name in backends:
        m = copy.deepcopy(model).train()
        for p in m.parameters():
            p.requires_grad_(False)
        if name == "base":
            m.enable_input_require_grads()
        elif name == "peft":
            torch.manual_seed(0)
            cfg = peft.LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=target_modules)
            m = get_peft_model(m, cfg).train()
        else:
            torch.manual_seed(0)
            m = apply_runlora(
                m, r=r, alpha=alpha, dropout=dropout, target_modules=target_modules, chain=mode
            ).train()
        out[name] = m
    return out


def _model_step(model: nn.Module, batch: dict[str, torch.Tensor]) -> Callable[[], None]:
    params = [p for p in model.parameters() if p.requires_grad]

    def step() -> None:
        model(**batch).loss.backward()
        for p in params:
            p.grad = None

    return step


def race_model(
    model: str | nn.Module = "llama-135m-shapes",
    *,
    batch: int = 4,
    seq: int = 256,
    r: int = 16,
    alpha: float | None = None,
    dropout: float = 0.05,
    dtype: str = "fp32",
    target_modules="all-linear",
    mode: str = "auto",
    reps: int = 5,
    warmup: int = 1,
    on_measurement: Callable[[Measurement], None] | None = None,
    cancel: Callable[[], bool] | None = None,
) -> ModelRace:
    """Time a whole training step (forward + backward) without adapters, with PEFT and with runlora_nb.

    Args:
        model: zoo name or a model (left untouched: each candidate gets its own copy).
        batch: sequences per step.
        seq: tokens per sequence.
        r: rank on every targeted layer.
        alpha: LoRA alpha (default 2·r).
        dropout: adapter dropout.
        dtype: base dtype when loading by name.
        target_modules: ``"all-linear"`` or names.
        mode: runlora planner mode.
        reps: interleaved timed rounds.
        warmup: untimed rounds.
        on_measurement: called per candidate after each round.
        cancel: polled between steps; stops early (``times.attrs["cancelled"]``).

    Returns:
        A :class:`ModelRace`.
    """
    from .train import plan_table

    base_model = _load(model, dtype_name(dtype))
    name = model if isinstance(model, str) else type(model).__name__
    alpha = 2 * r if alpha is None else alpha
    variants = adapter_variants(
        base_model, r=r, alpha=alpha, dropout=dropout, target_modules=target_modules, mode=mode
    )
    data = random_batch(base_model, batch, seq)
    labels = {"base": "no adapters", "peft": "peft", "runlora": "runlora"}
    kinds = {"base": "floor", "peft": "peft", "runlora": "plan"}
    cands = {}
    with torch.random.fork_rng(devices=[]):
        for key, m in variants.items():
            with SavedTensorRecorder(m) as rec:
                loss = m(**data).loss
            loss.backward()
            cands[labels[key]] = _Candidate(labels[key], kinds[key], m, saved_bytes=rec.activation_bytes())
        steps = {c.name: _model_step(c.module, data) for c in cands.values()}
        collected: dict[str, list[float]] = {}

        def keep(k: int, samples: dict[str, list[float]]) -> None:
            for cname, ts in samples.items():
                collected[cname] = list(ts)
                if on_measurement is not None:
                    on_measurement(_measurement(cands[cname], ts, final=(k == reps - 1)))

        cancelled = False
        try:
            interleaved(steps, warmup=warmup, reps=reps, cancel=cancel, on_round=keep)
        except Cancelled:
            cancelled = True
    med = {c: statistics.median(ts) for c, ts in collected.items() if ts}
    base_t, peft_t = med.get("no adapters", math.nan), med.get("peft", math.nan)
    peft_saved = cands["peft"].saved_bytes
    rows = [
        {
            "candidate": c.name,
            "median_s": med.get(c.name, math.nan),
            "iqr_s": _measurement(c, collected.get(c.name, []), True).iqr,
            "ratio_base": med.get(c.name, math.nan) / base_t,
            "ratio_peft": med.get(c.name, math.nan) / peft_t,
            "saved_bytes": c.saved_bytes,
            "saved_over_peft": c.saved_bytes / peft_saved if peft_saved else math.nan,
            "tokens_per_s": batch * seq / med.get(c.name, math.nan),
            "reps": len(collected.get(c.name, [])),
            "model": name,
            "batch": batch,
            "seq": seq,
            "rank": r,
            "dropout": dropout,
            "dtype": dtype_name(dtype),
        }
        for c in cands.values()
    ]
    times = pd.DataFrame(rows, columns=MODEL_COLUMNS)
    times.attrs["cancelled"] = cancelled
    return ModelRace(times, plan_table(variants["runlora"]))


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
    base_model = _load(model, dtype_name(dtype))
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
    base = _make_base(spec)
    modules = {"peft": _peft_module(base, spec), "runlora": _runlora(base, spec, "auto")}
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


def estimate_memory(
    model: nn.Module, *, batch: int, seq: int, r: int, dropout: float = 0.05, target_modules="all-linear"
) -> pd.DataFrame:
    """Training memory for a choice, measured on the real model: weights, adapters + AdamW state, and the
    activations autograd keeps (exact, one forward each) with PEFT and with runlora_nb.

    Returns:
        One row per backend: weights_bytes, adapter_bytes (params + grads + 2 AdamW moments), activation_bytes,
        total_bytes.
    """
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    variants = adapter_variants(
        model, r=r, alpha=2 * r, dropout=dropout, target_modules=target_modules, backends=("peft", "runlora")
    )
    data = random_batch(model, batch, seq)
    rows = []
    with torch.random.fork_rng(devices=[]):
        for key, m in variants.items():
            trainable = sum(p.numel() * p.element_size() for p in m.parameters() if p.requires_grad)
            with SavedTensorRecorder(m) as rec:
                m(**data)
            acts = rec.activation_bytes()
            rows.append(
                {
                    "backend": key,
                    "weights_bytes": weights,
                    "adapter_bytes": 4 * trainable,
                    "activation_bytes": acts,
                    "total_bytes": weights + 4 * trainable + acts,
                }
            )
    return pd.DataFrame(rows)
