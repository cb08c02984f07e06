"""RunsPanel: the widgets over a :class:`~runlora_nb.widgets.runs.RunsController` (the Runs tab)."""

from __future__ import annotations

import html
from typing import Any

import ipywidgets as widgets
import plotly.graph_objects as go

from .chrome import Panel
from .formatting import df_html, ema
from .runs import RunsController, run_label

__all__ = ["RunsPanel"]


class RunsPanel(Panel):
    """Pick runs from the ledger: their curves overlaid, the config differences, the samples side by side.

    Train loss is solid (smoothed with the slider; the raw curve stays faint behind it), validation loss dashed
    next to it; a log-scale toggle. Works for every run of the ledger: engine, panel, CLI, sweep trials and
    Trainer runs recorded by :class:`~runlora_nb.ledger.hf_trainer.LedgerCallback`.

    Args:
        controller: the state (default: a new :class:`RunsController` on the default ledger root).

    Attributes:
        picker: the run multi-select; refresh_button; smoothing; log_y.
        figure: the overlaid curves; summary_html, diff_html, samples_html: the tables; status: a line.
    """

    def __init__(self, controller: RunsController | None = None, **ledger: Any) -> None:
        super().__init__()
        self.add_class("runlora-runs")
        self.controller = controller or RunsController(**ledger)
        self.picker = widgets.SelectMultiple(
            options=[], rows=8, description="runs", layout=widgets.Layout(width="900px")
        )
        self.refresh_button = widgets.Button(description="Refresh", icon="refresh")
        self.smoothing = widgets.FloatSlider(value=0.0, min=0.0, max=0.99, step=0.01, description="smoothing")
        self.log_y = widgets.ToggleButton(value=False, description="log scale", icon="line-chart")
        self.status = widgets.HTML()
        self.status.add_class("runlora-status")
        self.figure = go.FigureWidget(layout={"height": 420, "xaxis": {"title": {"text": "step"}}})
        self.summary_html, self.diff_html, self.samples_html = widgets.HTML(), widgets.HTML(), widgets.HTML()
        self.on_click(self.refresh_button, self.refresh)
        self.on_change(self.picker, lambda ids: self.controller.select(list(ids)))
        self.on_change(self.smoothing, lambda _v: self._draw())
        self.on_change(self.log_y, lambda _v: self._draw())
        self.add_cleanup(self.controller.subscribe(self.guard(self._on_event, where="runs update")))
        self.children = [
            widgets.HTML("<b>Runs</b>: every fine-tune of the ledger; pick several to put them side by side"),
            widgets.HBox([self.refresh_button, self.smoothing, self.log_y]),
            self.picker,
            self.status,
            self.figure,
            widgets.HTML("<b>summary</b>"),
            self.summary_html,
            widgets.HTML("<b>config differences</b>"),
            self.diff_html,
            widgets.HTML("<b>samples</b>"),
            self.samples_html,
            self.errors.widget,
        ]
        self.refresh()

    def refresh(self) -> None:
        """Re-read the ledger (the Refresh button)."""
        self.controller.refresh()

    def _on_event(self, kind: str, payload: Any) -> None:
        if kind == "runs":
            runs = payload
            options = [(run_label(row), row["id"]) for _, row in runs.iterrows()] if len(runs) else []
            self.picker.options = options
            self.picker.value = tuple(
                i for i in self.controller.selected if i in dict(map(reversed, options))
            )
        self._draw()

    def _draw(self) -> None:
        ctl = self.controller
        n = len(ctl.runs)
        if not ctl.selected:
            with self.figure.batch_update():
                self.figure.data = ()
            self.status.value = f"<i>{n} runs under {html.escape(ctl.where)}; pick some to compare</i>"
            self.summary_html.value = self.diff_html.value = self.samples_html.value = ""
            return
        cmp = ctl.comparison()
        traces = []
        for spec in cmp.figure["data"]:
            y = list(spec["y"])
            if spec["name"].endswith(" train") and self.smoothing.value > 0:
                faint = {**spec, "showlegend": False, "opacity": 0.25, "hoverinfo": "skip"}
                traces.append(go.Scatter(faint))
                spec = {
                    **spec,
                    "y": ema([v if v is not None else float("nan") for v in y], self.smoothing.value),
                }
            traces.append(go.Scatter(spec))
        with self.figure.batch_update():
            self.figure.data = ()
            for t in traces:
                self.figure.add_trace(t)
            self.figure.update_layout(title=cmp.figure["layout"]["title"], legend={"orientation": "h"})
            self.figure.update_yaxes(type="log" if self.log_y.value else "linear", title_text="loss")
        self.status.value = f"{len(ctl.selected)} of {n} runs: train loss solid, validation loss dashed"
        self.summary_html.value = df_html(cmp.summary)
        self.diff_html.value = df_html(cmp.config_diff) if len(cmp.config_diff) else "<i>same config</i>"
        samples = ctl.samples().table
        self.samples_html.value = df_html(samples) if len(samples) else "<i>no samples recorded</i>"
