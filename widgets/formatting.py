"""Text for the panels: sizes, durations, counts, DataFrames as HTML, and a smoothed series.

Pure functions, no widget import: controllers, views and tests all use them.
"""

from __future__ import annotations

import math

import pandas as pd

__all__ = ["df_html", "ema", "fmt_bytes", "fmt_count", "fmt_seconds"]


def fmt_bytes(n: float | None) -> str:
    """``1536`` → ``"1.5 KiB"``; None or NaN → ``"–"``."""
    if n is None or (isinstance(n, float) and math.isnan(n)):
        return "–"
    n = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def fmt_seconds(s: float | None) -> str:
    """Seconds as ``"812 µs"``, ``"3.4 ms"``, ``"2.5 s"`` or ``"3 min 20 s"``; None or NaN → ``"–"``."""
    if s is None or math.isnan(s):
        return "–"
    if s < 1e-3:
        return f"{s * 1e6:.0f} µs"
    if s < 1:
        return f"{s * 1e3:.1f} ms"
    if s < 120:
        return f"{s:.1f} s"
    return f"{int(s // 60)} min {int(s % 60)} s"


def fmt_count(n: int) -> str:
    """``134515008`` → ``"134.5 M"``."""
    for limit, unit in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(n) >= limit:
            return f"{n / limit:.1f} {unit}"
    return str(int(n))


def df_html(df: pd.DataFrame, *, max_rows: int = 60, floatfmt: str = "{:.4g}") -> str:
    """A compact HTML table of ``df`` (numbers shortened, index hidden)."""
    if df is None or df.empty:
        return "<i>nothing yet</i>"
    shown = df.head(max_rows)
    table = shown.to_html(
        index=False,
        border=0,
        float_format=lambda v: floatfmt.format(v),
        na_rep="–",
        classes="runlora-table",
    )
    more = f"<div><i>… {len(df) - max_rows} more rows</i></div>" if len(df) > max_rows else ""
    style = (
        "<style>.runlora-table{border-collapse:collapse;font-size:12px}"
        ".runlora-table td,.runlora-table th{padding:2px 8px;text-align:right}"
        ".runlora-table tr:nth-child(even){background:rgba(127,127,127,.08)}</style>"
    )
    return style + table + more


def ema(values: list[float], weight: float) -> list[float]:
    """TensorBoard-style smoothing: an exponential moving average with bias correction.

    Args:
        values: the raw series (NaNs are carried over, not averaged).
        weight: 0 (no smoothing) … <1.

    Returns:
        A list as long as ``values``.
    """
    out, avg, n = [], 0.0, 0
    for v in values:
        if not math.isfinite(v):
            out.append(v)
            continue
        avg, n = weight * avg + (1 - weight) * v, n + 1
        out.append(avg / (1 - weight**n) if weight > 0 else v)
    return out
