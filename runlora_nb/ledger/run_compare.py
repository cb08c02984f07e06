"""Runs side by side: their curves overlaid, the config fields that differ, a summary per run, a plotly figure.

Reads the ledger through :mod:`runlora_nb.ledger.reader` only (``load_run``); it writes nothing.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

import pandas as pd

from ..common.jsonfiles import finite_or_none
from ..common.metrics import steady_tokens_per_s
from .reader import load_run

__all__ = ["Comparison", "compare"]


@dataclass
class Comparison:
    """Runs side by side.

    Attributes:
        curves: tidy table run, step, metric (train_loss / val_loss), value.
        config_diff: one row per config field that differs, one column per run.
        summary: one row per run (status, steps reached, last train and val loss, median tokens/s).
        figure: plotly spec ``{"data": [...], "layout": {...}}``: train loss solid, val loss dashed with markers.
    """

    curves: pd.DataFrame
    config_diff: pd.DataFrame
    summary: pd.DataFrame
    figure: dict


def compare(ids: list[str], root: str | os.PathLike | None = None) -> Comparison:
    """Overlay runs' curves and list their config differences.

    Args:
        ids: run ids (or run folders), at least one.
        root: the ledger root.

    Returns:
        A :class:`Comparison`.

    Raises:
        ValueError: no ids, or an unknown run.
    """
    if not ids:
        raise ValueError("runs.compare: give at least one run id (`runlora-nb runs list` shows them)")
    runs = [load_run(i, root) for i in ids]
    frames = []
    for run in runs:
        for df, col in ((run.steps, "train_loss"), (run.evals, "val_loss")):
            if len(df) and col in df:
                frames.append(pd.DataFrame({"run": run.id, "step": df.step, "metric": col, "value": df[col]}))
    curves = (
        pd.concat(frames, ignore_index=True)
        if frames
        else pd.DataFrame(columns=["run", "step", "metric", "value"])
    )
    keys = sorted({k for run in runs for k in run.config})
    diff_rows = []
    for key in keys:
        values = [json.dumps(run.config.get(key), default=str) for run in runs]
        if len(set(values)) > 1:
            diff_rows.append({"field": key, **{run.id: run.config.get(key) for run in runs}})
    config_diff = pd.DataFrame(diff_rows, columns=["field", *[r.id for r in runs]])
    summary = pd.DataFrame(
        [
            {
                "id": r.id,
                "status": r.status,
                "step": int(r.steps.step.max()) if len(r.steps) else 0,
                "train_loss": float(r.steps.train_loss.iloc[-1]) if len(r.steps) else None,
                "val_loss": float(r.evals.val_loss.iloc[-1]) if len(r.evals) else None,
                "tokens_per_s": finite_or_none(steady_tokens_per_s(r.steps.tokens_per_s))
                if len(r.steps)
                else None,
            }
            for r in runs
        ]
    )
    return Comparison(curves, config_diff, summary, _figure(curves, [r.id for r in runs]))


def _figure(curves: pd.DataFrame, ids: list[str]) -> dict:
    palette = ["#1e88e5", "#ef6c00", "#2e7d32", "#8e24aa", "#c62828", "#00897b", "#6d4c41", "#3949ab"]
    data = []
    for k, run_id in enumerate(ids):
        color = palette[k % len(palette)]
        for metric, line in (("train_loss", {"width": 1.5}), ("val_loss", {"width": 2, "dash": "dash"})):
            sel = curves[(curves.run == run_id) & (curves.metric == metric)]
            if not len(sel):
                continue
            data.append(
                {
                    "type": "scatter",
                    "mode": "lines" if metric == "train_loss" else "lines+markers",
                    "name": f"{run_id} {metric.split('_')[0]}",
                    "legendgroup": run_id,
                    "x": [int(s) for s in sel.step],
                    "y": [finite_or_none(float(v)) for v in sel.value],
                    "line": {"color": color, **line},
                }
            )
    layout = {
        "title": {"text": "Runs: train loss (solid) and validation loss (dashed)"},
        "xaxis": {"title": {"text": "step"}},
        "yaxis": {"title": {"text": "loss"}},
        "height": 420,
        "legend": {"orientation": "h"},
    }
    return {"data": data, "layout": layout}
