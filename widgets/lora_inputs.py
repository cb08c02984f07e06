"""The LoRA layer-shape inputs (N tokens, i, o, r, dropout) shared by the race and the lab panels."""

from __future__ import annotations

import math
from typing import Any

import ipywidgets as widgets

__all__ = ["FEATURES", "RANKS", "TOKENS", "nearest", "shape_sliders"]

TOKENS = [16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384]
FEATURES = [32, 64, 128, 256, 384, 512, 576, 768, 1024, 1536, 2048, 3072, 4096, 8192]
RANKS = [1, 2, 4, 8, 16, 32, 64, 128, 256]


def nearest(options: list[int], value: int) -> int:
    """The option closest to ``value`` on a log scale (``value`` itself when it is an option)."""
    return value if value in options else min(options, key=lambda o: abs(math.log(o) - math.log(value)))


def shape_sliders(settings: Any, style: dict) -> dict[str, widgets.Widget]:
    """The N, i, o, r and dropout sliders of a layer, set from ``settings`` (any object with those fields).

    Returns:
        ``{"tokens", "in_features", "out_features", "rank", "dropout"}`` → widget.
    """

    def select(options: list[int], value: int, description: str) -> widgets.SelectionSlider:
        return widgets.SelectionSlider(
            options=options, value=nearest(options, value), description=description, **style
        )

    return {
        "tokens": select(TOKENS, settings.tokens, "N tokens"),
        "in_features": select(FEATURES, settings.in_features, "i (in)"),
        "out_features": select(FEATURES, settings.out_features, "o (out)"),
        "rank": select(RANKS, settings.rank, "r"),
        "dropout": widgets.FloatSlider(
            value=settings.dropout, min=0.0, max=0.5, step=0.05, description="dropout", **style
        ),
    }
