"""SweepPanel: the Sweep tab, a thin view over a :class:`~runlora_nb.widgets.sweep.SweepController`."""

from __future__ import annotations

import html
from typing import Any

import ipywidgets as widgets
import plotly.graph_objects as go

from runlora_nb.train.device import device_choices

from .chrome import Panel
from .formatting import df_html
from .sweep import SweepController

__all__ = ["SweepPanel"]

_STYLE = {"style": {"description_width": "110px"}, "layout": widgets.Layout(width="330px")}
PALETTE = ["#1e88e5", "#ef6c00", "#2e7d32", "#8e24aa", "#c62828", "#00897b", "#6d4c41", "#3949ab"]
BOARD_COLUMNS = ["trial", "r", "lr", "alpha_over_r", "dropout", "backend", "val_loss", "perplexity",
                 "tokens_per_s", "peak_mem_bytes", "trainable_params", "time_s", "status"]  # fmt: skip
MIN_TRIALS_FOR_VIEWS = 3  # optuna's parallel-coordinates and importance views need a few finished trials


class SweepPanel(Panel):
    """Search rank × learning rate (and more) with optuna; every trial's validation curve overlaid live.

    Args:
        controller: the state (default: a new :class:`SweepController` with ``**settings``).

    Attributes:
        model, dataset, r, lr, alpha_over_r, dropout, steps, trials, study, device: the inputs.
        start_button, stop_button: the actions; status: the progress line.
        figure: one validation-loss line per trial; board_html: the leaderboard; views: optuna's plots.
    """

    def __init__(self, controller: SweepController | None = None, **settings: Any) -> None:
        super().__init__()
        self.add_class("runlora-sweep")
        self.controller = controller or SweepController(**settings)
        s = self.controller.settings
        text = {"continuous_update": False, **_STYLE}
        self.model = widgets.Text(value=s.model, description="model", **text)
        self.dataset = widgets.Text(value=s.dataset, description="dataset", **text)
        self.r = widgets.Text(value=s.r, description="r", placeholder="4,8,16 or 4:32", **text)
        self.lr = widgets.Text(value=s.lr, description="lr", placeholder="1e-3,3e-3 or 1e-4:1e-2:log", **text)
        self.alpha_over_r = widgets.Text(value=s.alpha_over_r, description="alpha / r", **text)
        self.dropout = widgets.Text(value=s.dropout, description="dropout", **text)
        self.steps = widgets.BoundedIntText(value=s.steps, min=1, max=100_000, description="steps", **_STYLE)
        self.trials = widgets.BoundedIntText(
            value=s.trials, min=1, max=10_000, description="trials", **_STYLE
        )
        self.study = widgets.Text(value=s.study, description="study", **text)
        self.device = widgets.Dropdown(
            options=list(device_choices()), value=s.device, description="device", **_STYLE
        )
        self.start_button = widgets.Button(description="Start", icon="play", button_style="success")
        self.stop_button = widgets.Button(description="Stop", icon="stop", disabled=True)
        self.status = widgets.HTML("<i>ready: same study name resumes</i>")
        self.status.add_class("runlora-status")
        self.figure = go.FigureWidget(
            layout={
                "height": 380,
                "title": {"text": "validation loss per trial"},
                "xaxis": {"title": {"text": "step"}},
                "yaxis": {"title": {"text": "val loss"}},
                "legend": {"orientation": "h"},
            }
        )
        self.board_html = widgets.HTML()
        self.board_html.add_class("runlora-leaderboard")
        self.views = widgets.Output()
        self._redraw = self.throttled(self._draw)
        for name in (
            "model",
            "dataset",
            "r",
            "lr",
            "alpha_over_r",
            "dropout",
            "steps",
            "trials",
            "study",
            "device",
        ):
            self.on_change(getattr(self, name), lambda v, name=name: self.controller.set(**{name: v}))
        self.on_click(self.start_button, self.start)
        self.on_click(self.stop_button, self.controller.stop)
        self.add_cleanup(self.controller.subscribe(self.guard(self._on_event, where="sweep update")))
        self.add_cleanup(self.controller.stop)
        self.children = [
            widgets.HTML("<b>Sweep</b>: optuna searches the settings; each trial is a run in the ledger"),
            widgets.HBox(
                [
                    widgets.VBox([self.model, self.dataset, self.study]),
                    widgets.VBox([self.r, self.lr, self.alpha_over_r]),
                    widgets.VBox([self.dropout, self.steps, self.trials, self.device]),
                ]
            ),
            widgets.HBox([self.start_button, self.stop_button]),
            self.status,
            self.figure,
            widgets.HTML("<b>leaderboard</b>"),
            self.board_html,
            self.views,
            self.errors.widget,
        ]

    def start(self) -> None:
        """Start (or resume) the sweep (the Start button)."""
        if self.closed:
            raise RuntimeError("SweepPanel: this panel was closed; display a new one")
        self.errors.clear()
        self.views.outputs = ()
        self.controller.start()
        self._draw()

    def _on_event(self, kind: str, payload: Any) -> None:
        if kind in ("done", "error", "trial"):
            self._redraw.flush()
            if kind == "error":
                self.errors.show(f"sweep: {payload}")
            if kind == "done":
                self._show_views()
        else:
            self._redraw()

    def _draw(self) -> None:
        ctl = self.controller
        curves = ctl.snapshot()
        with self.figure.batch_update():
            while len(self.figure.data) < len(curves):
                k = len(self.figure.data)
                self.figure.add_scatter(mode="lines+markers", line={"color": PALETTE[k % len(PALETTE)]})
            for trace, c in zip(self.figure.data, curves):
                trace.x, trace.y, trace.name = c.steps, c.val_loss, f"{c.run_id[-8:]} {c.label}"
        running = ctl.running
        self.start_button.disabled, self.stop_button.disabled = running, not running
        board = ctl.board
        if board is None and curves:
            try:
                board = ctl.current_leaderboard()
            except ValueError:  # the study is not created yet
                board = None
        if board is not None:
            show = board[[c for c in BOARD_COLUMNS if c in board]].copy()
            if "peak_mem_bytes" in show:
                show["peak_mem_bytes"] = show["peak_mem_bytes"] / 2**20
                show = show.rename(columns={"peak_mem_bytes": "peak MiB"})
            self.board_html.value = df_html(show)
        if ctl.error:
            self.status.value = "<span style='color:#b00020'>the sweep failed (see the error below)</span>"
        elif running:
            self.status.value = f"sweeping {html.escape(ctl.settings.study)}: {len(curves)} trials started"
        elif board is not None:
            done = int((board.status == "complete").sum())
            self.status.value = f"<b>done</b>: {len(board)} trials in study {html.escape(ctl.settings.study)}, {done} complete"

    def _show_views(self) -> None:
        board = self.controller.board
        if board is None or int((board.status == "complete").sum()) < MIN_TRIALS_FOR_VIEWS:
            return
        import optuna

        study = self.controller.study()
        self.views.outputs = ()
        for plot in (
            optuna.visualization.plot_parallel_coordinate,
            optuna.visualization.plot_param_importances,
        ):
            try:
                fig = plot(study)
            except (ValueError, RuntimeError) as err:  # e.g. importances need two varied parameters
                self.views.append_stdout(f"{plot.__name__}: {err}\n")
                continue
            fig.update_layout(height=320, width=900)
            self.views.append_display_data(go.FigureWidget(fig))
