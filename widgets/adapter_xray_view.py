"""The LoRA X-ray section of the LoRA lab: ‖sBA‖ and effective rank per module, as bars and a table.

The numbers come from :mod:`runlora_nb.widgets.adapter_xray` (a fine-tune's latest X-ray, or a saved run's);
this module only draws them. Errors go to the owning panel's error area.
"""

from __future__ import annotations

import html
import threading
from collections.abc import Callable
from typing import Any

import ipywidgets as widgets
import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from .adapter_xray import finished_run_xray, last_xray, xray_summary
from .chrome import Panel
from .formatting import df_html

__all__ = ["XraySection"]

NORM, ERANK = range(2)  # trace indices


class XraySection(widgets.VBox):
    """What each adapter learnt: live from a fine-tune (after each evaluation) or from a saved run folder.

    Args:
        panel: the owning panel (its error area and guarded callbacks).
        runs: returns the fine-tune's runs (:class:`~runlora_nb.widgets.finetune.RunTrace`); None: folders only.

    Attributes:
        refresh_button: X-ray the last fine-tune's latest evaluation.
        folder, open_button: a ledger run folder or an adapter folder, and the button that reads it.
        caption: what is shown (which run, which step).
        figure: ‖sBA‖_F and effective rank per module (two bar charts).
        table: the per-module numbers.
    """

    def __init__(self, panel: Panel, runs: Callable[[], list] | None = None) -> None:
        super().__init__()
        self.add_class("runlora-xray")
        self.panel, self.runs = panel, runs
        self.refresh_button = widgets.Button(description="X-ray last fine-tune", disabled=runs is None)
        self.folder = widgets.Text(placeholder="run folder or adapter folder", layout={"width": "360px"})
        self.open_button = widgets.Button(description="X-ray folder")
        self.caption = widgets.HTML("<i>no X-ray yet: fine-tune, or open a run folder</i>")
        self.figure = _make_figure()
        self.table = widgets.HTML()
        self._pending: tuple[pd.DataFrame, str] | None = None
        self._lock = threading.Lock()
        self._redraw = panel.throttled(self._draw)
        panel.on_click(self.refresh_button, self.refresh)
        panel.on_click(self.open_button, self.open_folder)
        self.children = [
            widgets.HTML(
                "<b>LoRA X-ray</b>: per module ‖sBA‖, singular values and effective rank of the update sBA, "
                "gradient norms and the chain pair"
            ),
            widgets.HBox([self.refresh_button, self.folder, self.open_button]),
            self.caption,
            self.figure,
            self.table,
        ]

    def show(self, table: pd.DataFrame, caption: str) -> None:
        """Draw an X-ray table (any thread: the draw is throttled)."""
        with self._lock:
            self._pending = (table, caption)
        self._redraw()

    def follow(self, kind: str, payload: Any) -> None:
        """A fine-tune controller event: redraw on each new X-ray."""
        if kind == "xray":
            trace, snap = payload
            self.show(snap.table, f"{trace.backend} run, after step {snap.step} (live)")

    def refresh(self) -> None:
        snap = last_xray(self.runs()) if self.runs is not None else None
        if snap is None:
            self.caption.value = "<i>no fine-tune X-ray yet: start a run in the Fine-tune tab</i>"
            return
        self.show(snap.table, f"last fine-tune, after step {snap.step}")
        self._redraw.flush()

    def open_folder(self) -> None:
        path = self.folder.value.strip()
        if not path:
            raise ValueError("type a run folder or an adapter folder first")
        self.show(finished_run_xray(path), f"saved adapter {path}")
        self._redraw.flush()

    def _draw(self) -> None:
        with self._lock:
            pending, self._pending = self._pending, None
        if pending is None:
            return
        table, caption = pending
        names = [_short(m) for m in table["module"]]
        if len(set(names)) < len(names):  # a category axis would merge equal labels into one bar
            names = list(table["module"])
        with self.figure.batch_update():
            self.figure.data[NORM].x, self.figure.data[NORM].y = names, list(table["norm"])
            self.figure.data[ERANK].x, self.figure.data[ERANK].y = names, list(table["effective_rank"])
        self.caption.value = f"{html.escape(caption)}: {len(table)} LoRA modules"
        self.table.value = df_html(xray_summary(table))


def _short(module: str) -> str:
    """``model.layers.3.self_attn.q_proj`` → ``3.q_proj``: the bars' labels stay readable."""
    parts = module.split(".")
    digits = [p for p in parts if p.isdigit()]
    return f"{digits[-1]}.{parts[-1]}" if digits else parts[-1]


def _make_figure() -> go.FigureWidget:
    fig = make_subplots(
        rows=1, cols=2, horizontal_spacing=0.1, subplot_titles=("‖sBA‖_F", "effective rank (entropy)")
    )
    fig.add_bar(name="‖sBA‖", marker_color="#1565c0", row=1, col=1)
    fig.add_bar(name="effective rank", marker_color="#2e7d32", row=1, col=2)
    fig.update_xaxes(type="category", tickangle=-60)
    fig.update_yaxes(rangemode="tozero")
    fig.update_layout(width=980, height=320, margin={"l": 10, "r": 10, "t": 40, "b": 90}, showlegend=False)
    return go.FigureWidget(fig)
