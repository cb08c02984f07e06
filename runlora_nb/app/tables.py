"""Plain-text tables of benchmark results, shared by the CLI and the demo."""

from __future__ import annotations

import pandas as pd

__all__ = ["format_layer_table"]


def format_layer_table(df: pd.DataFrame) -> str:
    """A readable race table: ms, IQR, ratios, saved memory, GFLOP, predicted ms."""
    if df.empty:
        return "(no measurements)"
    show = pd.DataFrame(
        {
            "candidate": df.candidate,
            "median ms": df.median_s * 1e3,
            "IQR ms": df.iqr_s * 1e3,
            "×frozen": df.ratio_frozen,
            "×PEFT": df.ratio_peft,
            "saved MiB": df.saved_bytes / 2**20,
            "saved/X": df.saved_over_x,
            "GFLOP": df.flops / 1e9,
            "pred ms": df.predicted_s.astype(float) * 1e3,
        }
    )
    if df.peak_bytes.notna().any():
        show["peak MiB"] = df.peak_bytes.astype(float) / 2**20
    text = show.to_string(index=False, float_format=lambda v: f"{v:.3g}", na_rep="-")
    return "\n".join([text, *(f"NOTE: {note}" for note in df.attrs.get("notes", ()))])
