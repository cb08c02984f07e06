"""Self-contained HTML reports with plotly charts, written without importing plotly.

Charts are plain plotly JSON specs (``{"data": [...], "layout": {...}}``) built from the benchmark and training
DataFrames; the same specs feed ``go.FigureWidget`` in the panels. The HTML embeds plotly.js from the installed
plotly package's data file (found without importing plotly), or loads it from the CDN when plotly is absent.
"""

from __future__ import annotations

import html
import importlib.util
import json
import math
from collections.abc import Sequence
from pathlib import Path

import pandas as pd

from ..common.paths import atomic_write_text

__all__ = [
    "figure_html",
    "layer_race_figure",
    "loss_figure",
    "memory_figure",
    "model_race_figure",
    "write_report",
]

COLORS = {"floor": "#9e9e9e", "peft": "#ef6c00", "plan": "#2e7d32", "twin": "#81c784", "pair": "#1e88e5"}


def _clean(v):
    return None if isinstance(v, float) and math.isnan(v) else v


def _time_bars(df: pd.DataFrame, colors: list[str], title: str, ytitle: str, height: int, **extra) -> dict:
    """Bars of median ms per candidate with IQR error bars (the shared shape of the race charts)."""
    bar = {
        "type": "bar",
        "x": list(df.candidate),
        "y": [v * 1e3 for v in df.median_s],
        "error_y": {"type": "data", "array": [v * 1e3 for v in df.iqr_s], "visible": True},
        "marker": {"color": colors},
        **extra,
    }
    layout = {"title": {"text": title}, "yaxis": {"title": {"text": ytitle}}, "height": height}
    return {"data": [bar], "layout": layout}


def layer_race_figure(df: pd.DataFrame, title: str = "Forward + backward time per candidate") -> dict:
    """Bar chart of median seconds (ms) with IQR error bars, coloured by kind (floor / PEFT / plan / pair)."""
    df = df.sort_values("median_s")
    return _time_bars(
        df,
        [COLORS.get(k, COLORS["pair"]) for k in df.kind],
        title,
        "median ms (IQR bars)",
        380,
        text=[f"{r:.2f}× frozen" for r in df.ratio_frozen],
        hovertemplate="%{x}: %{y:.3g} ms (%{text})<extra></extra>",
    )


def memory_figure(df: pd.DataFrame, title: str = "Activations kept for backward") -> dict:
    """Bar chart of saved activation bytes (MiB) per candidate."""
    return {
        "data": [
            {
                "type": "bar",
                "x": list(df.candidate),
                "y": [b / 2**20 for b in df.saved_bytes],
                "marker": {"color": [COLORS.get(k, COLORS["pair"]) for k in df.kind]} if "kind" in df else {},
            }
        ],
        "layout": {"title": {"text": title}, "yaxis": {"title": {"text": "MiB"}}, "height": 320},
    }


def model_race_figure(times: pd.DataFrame, title: str = "Training step (forward + backward)") -> dict:
    """Bars of median step time with IQR for no adapters / PEFT / runlora_nb."""
    kinds = {"no adapters": "floor", "peft": "peft", "runlora": "plan"}
    colors = [COLORS[kinds.get(c, "pair")] for c in times.candidate]
    return _time_bars(times, colors, title, "median ms", 360)


def loss_figure(curves: dict[str, tuple[pd.DataFrame, pd.DataFrame]], title: str = "Loss") -> dict:
    """Train loss per step and validation loss per evaluation, one pair of traces per run label.

    Args:
        curves: label → (steps table with step/loss, evals table with step/val_loss).
    """
    palette = ["#2e7d32", "#ef6c00", "#1e88e5", "#8e24aa"]
    data = []
    for k, (label, (steps, evals)) in enumerate(curves.items()):
        color = palette[k % len(palette)]
        data.append(
            {"type": "scatter", "mode": "lines", "name": f"{label} train", "x": list(steps.step),
             "y": list(steps.loss), "line": {"color": color}}
        )  # fmt: skip
        if len(evals):
            data.append(
                {"type": "scatter", "mode": "lines+markers", "name": f"{label} validation", "x": list(evals.step),
                 "y": [_clean(v) for v in evals.val_loss], "line": {"color": color, "dash": "dot"}}
            )  # fmt: skip
    return {
        "data": data,
        "layout": {"title": {"text": title}, "xaxis": {"title": {"text": "step"}},
                   "yaxis": {"title": {"text": "loss"}}, "height": 380},
    }  # fmt: skip


def _plotly_js() -> str:
    """<script> with plotly.js inlined from the installed plotly package, or from the CDN."""
    spec = importlib.util.find_spec("plotly")
    for root in (spec.submodule_search_locations or []) if spec else []:
        path = Path(root, "package_data", "plotly.min.js")
        if path.is_file():
            return f"<script>{path.read_text(encoding='utf-8')}</script>"
    return '<script src="https://cdn.plot.ly/plotly-2.35.2.min.js"></script>'


def figure_html(fig: dict, div_id: str) -> str:
    """A div and the script that draws ``fig`` into it (plotly.js must be loaded on the page)."""
    payload = json.dumps(fig, default=_clean)
    return f'<div id="{div_id}" class="chart"></div><script>(function(){{var f={payload};Plotly.newPlot("{div_id}",f.data,f.layout,{{responsive:true}});}})();</script>'


def write_report(
    path: str | Path,
    title: str,
    sections: Sequence[tuple[str, str | dict | pd.DataFrame]],
) -> Path:
    """Write one self-contained HTML page.

    Args:
        path: output file.
        title: page title.
        sections: (heading, content) pairs; content is a plotly spec dict, a DataFrame (rendered as a table)
            or text (escaped, kept as preformatted).

    Returns:
        The path written.
    """
    parts = []
    for k, (heading, content) in enumerate(sections):
        parts.append(f"<h2>{html.escape(heading)}</h2>")
        if isinstance(content, dict):
            parts.append(figure_html(content, f"fig{k}"))
        elif isinstance(content, pd.DataFrame):
            parts.append(
                content.to_html(index=False, float_format=lambda v: f"{v:.4g}", border=0, classes="table")
            )
        else:
            parts.append(f"<pre>{html.escape(str(content))}</pre>")
    page = f"""<!doctype html>
<html><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>body{{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em}}
table.table{{border-collapse:collapse;font-size:13px}} table.table td,table.table th{{padding:3px 8px;border-bottom:1px solid #ddd}}
pre{{background:#f6f6f6;padding:.8em;white-space:pre-wrap}} .chart{{margin-bottom:1.5em}}</style>
{_plotly_js()}</head><body><h1>{html.escape(title)}</h1>
{"".join(parts)}
</body></html>"""
    return atomic_write_text(path, page)
