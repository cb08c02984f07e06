"""TrainerMonitor: live charts of any Hugging Face ``Trainer`` / TRL ``SFTTrainer`` run.

A thin view over :class:`runlora_nb.ledger.hf_trainer.LedgerCallback` (the state and the event source, in the
core): pass ``monitor.callback`` in the trainer's ``callbacks=[...]``, display the monitor, call
``trainer.train()``. The run is also recorded in the ledger, so the Runs views and ``runlora-nb runs`` show it
afterwards.
"""

from __future__ import annotations

import html
import math
from typing import Any

import ipywidgets as widgets
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from runlora_nb.ledger.hf_trainer import LedgerCallback

from .chrome import Panel
from .formatting import ema, fmt_seconds

__all__ = ["TrainerMonitor", "ema"]

TRAIN, SMOOTH, EVAL, LR = range(4)  # trace indices


class TrainerMonitor(Panel):
    """Train loss (raw and smoothed), eval loss next to it, and the learning rate, live.

    Args:
        callback: the :class:`LedgerCallback` to watch (default: a new one with ``**ledger`` arguments).
        **ledger: ``root``, ``run_dir``, ``model_name``, ``dataset`` for the new callback.

    Attributes:
        callback: the callback to hand to the trainer.
        smoothing: the smoothing slider (0 … 0.99); log_y: the log-scale toggle.
        status: step, loss, eval loss, tokens/s line; figure: the chart.
    """

    def __init__(self, callback: LedgerCallback | None = None, **ledger: Any) -> None:
        super().__init__()
        self.add_class("runlora-trainer-monitor")
        self.callback = callback or LedgerCallback(**ledger)
        self.smoothing = widgets.FloatSlider(value=0.6, min=0.0, max=0.99, step=0.01, description="smoothing")
        self.log_y = widgets.ToggleButton(value=False, description="log scale", icon="line-chart")
        self.status = widgets.HTML("<i>waiting for trainer.train()</i>")
        self.status.add_class("runlora-status")
        fig = make_subplots(
            rows=1, cols=2, column_widths=[0.68, 0.32], subplot_titles=("loss", "learning rate")
        )
        fig.add_scatter(name="train loss", mode="lines", line={"color": "#90caf9"}, row=1, col=1)
        fig.add_scatter(name="train (smoothed)", mode="lines", line={"color": "#1565c0"}, row=1, col=1)
        fig.add_scatter(name="eval loss", mode="lines+markers", line={"color": "#ef6c00"}, row=1, col=1)
        fig.add_scatter(name="lr", mode="lines", line={"color": "#555"}, showlegend=False, row=1, col=2)
        fig.update_xaxes(title_text="step")
        fig.update_layout(width=900, height=360, margin={"l": 10, "r": 10, "t": 40, "b": 40})
        self.figure = go.FigureWidget(fig)
        self._redraw = self.throttled(self._draw)
        self.on_change(self.smoothing, lambda _v: self._draw())
        self.on_change(self.log_y, lambda _v: self._draw())
        self.add_cleanup(self.callback.subscribe(self.guard(self._on_event, where="trainer update")))
        self.children = [
            widgets.HTML(
                "<b>Trainer run</b>: train loss, eval loss and learning rate, recorded in the run ledger"
            ),
            widgets.HBox([self.smoothing, self.log_y]),
            self.status,
            self.figure,
            self.errors.widget,
        ]

    def _on_event(self, kind: str, record: dict) -> None:
        if kind == "end":
            self._redraw.flush()
        else:
            self._redraw()

    def _draw(self) -> None:
        steps = [r for k, r in self.callback.records if k == "step"]
        evals = [r for k, r in self.callback.records if k == "eval"]
        end = next((r for k, r in reversed(self.callback.records) if k == "end"), None)
        x = [r["step"] for r in steps]
        loss = [r["train_loss"] for r in steps]
        with self.figure.batch_update():
            data = self.figure.data
            data[TRAIN].x, data[TRAIN].y = x, loss
            data[SMOOTH].x, data[SMOOTH].y = x, ema(loss, self.smoothing.value)
            data[EVAL].x, data[EVAL].y = [r["step"] for r in evals], [r["val_loss"] for r in evals]
            data[LR].x, data[LR].y = x, [r["lr"] for r in steps]
            self.figure.update_yaxes(type="log" if self.log_y.value else "linear", row=1, col=1)
        self.status.value = self._status_text(steps, evals, end)

    def _status_text(self, steps: list[dict], evals: list[dict], end: dict | None) -> str:
        if not steps:
            return "<i>waiting for trainer.train()</i>"
        last = steps[-1]
        parts = [f"step {last['step']}", f"train loss {last['train_loss']:.4f}"]
        if evals:
            parts.append(f"eval loss {evals[-1]['val_loss']:.4f}")
        if math.isfinite(last.get("tokens_per_s", math.nan)):
            parts.append(f"{last['tokens_per_s']:,.0f} tokens/s")
        parts.append(f"{fmt_seconds(last['step_s'])}/step")
        head = f"<b>{html.escape(end['status'])}</b>: " if end else "training: "
        return head + ", ".join(parts) + f" · run {html.escape(str(self.callback.id))}"
