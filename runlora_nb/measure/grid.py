"""The layer grid: race many :class:`LayerSpec` settings, then judge the results against the targets."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import pandas as pd

from .layer_race import race_layer
from .spec import GRID, LAYER_COLUMNS, SPEC_COLUMNS, LayerSpec, Measurement

__all__ = ["check_targets", "geomean", "grid_specs", "race_grid"]


def race_grid(
    specs: Iterable[LayerSpec],
    *,
    reps: int = 7,
    warmup: int = 1,
    on_measurement: Callable[[Measurement], None] | None = None,
    cancel: Callable[[], bool] | None = None,
    progress: Callable[[int, LayerSpec], None] | None = None,
) -> pd.DataFrame:
    """:func:`race_layer` over several specs, concatenated (stops early if cancelled); ``attrs["notes"]`` holds
    every spec's timing notes (see :func:`~runlora_nb.measure.layer_race.timing_notes`), labelled by spec."""
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
    out.attrs[
        "notes"
    ] = [  # the timing notes of each spec's race: a noisy measurement says so next to its number
        f"{LayerSpec(**f.attrs['spec']).label()}: {note}" for f in frames for note in f.attrs.get("notes", ())
    ]
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
    by its own pair candidate, against the fastest pair), twin spread (the planner's candidate against its
    twin, the same layer timed again in every round, as max/min ≥ 1: the noise floor), saved/X, and booleans ``ok_frozen`` (≤ 1.10 at
    p=0, ≤ 1.15 at p>0), ``ok_peft`` (not slower than PEFT by > 3%), ``ok_best`` (the planner's pair within 5%
    of the fastest pair), ``ok_saved`` (≤ 1.07 × bytes(X)).
    """
    keys = list(SPEC_COLUMNS)
    rows = []
    for spec_vals, g in df.groupby(keys, sort=False, dropna=False):  # quant "" reads back from CSV as NaN
        plan = g[g.kind == "plan"].iloc[0]
        pairs = g[g.kind == "pair"]
        same = pairs[(pairs.fwd == plan.fwd) & (pairs.bwd == plan.bwd)]
        if same.empty:  # raced without the pairs: the planner's candidate is all there is
            pairs, same = g[g.kind == "plan"], g[g.kind == "plan"]
        best = pairs.loc[pairs.median_s.idxmin()]
        mine = same.median_s.iloc[0]
        twins = g[g.kind == "twin"]
        # the noise floor: the planner's layer against its twin (the same module timed again each round)
        twin_t = twins.median_s.iloc[0] if not twins.empty else mine
        limit = 1.10 if plan.dropout == 0 else 1.15
        rows.append(
            {
                **dict(zip(keys, spec_vals)),
                "plan": f"{plan.fwd}+{plan.bwd}",
                "plan_over_frozen": plan.ratio_frozen,
                "plan_over_peft": plan.ratio_peft,
                "best_pair": f"{best.fwd}+{best.bwd}",
                "pair_over_best": mine / best.median_s,
                "twin_spread": max(plan.median_s, twin_t) / min(plan.median_s, twin_t),
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
