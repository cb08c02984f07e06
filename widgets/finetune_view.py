"""FineTunePanel: the widgets over a :class:`~runlora_nb.widgets.finetune.FineTuneController`."""

from __future__ import annotations

import html
from typing import Any

import ipywidgets as widgets
import plotly.graph_objects as go

from runlora_nb.common.metrics import steady_tokens_per_s

from .chrome import Panel
from .finetune import FineTuneController, RunTrace
from .formatting import df_html, ema, fmt_seconds
from .memory_watch import measured_memory

__all__ = ["BACKEND_COLORS", "FineTunePanel"]

BACKEND_COLORS = {"runlora": "#2e7d32", "peft": "#ef6c00"}
_STYLE = {"style": {"description_width": "90px"}, "layout": widgets.Layout(width="340px")}
PLAN_COLUMNS = ["module", "in_features", "out_features", "tokens", "fwd", "bwd", "gflops", "predicted_ms"]


def _dataset_names() -> list[str]:
    from runlora_nb.assets.datasets import list_datasets

    return list(list_datasets()["name"])


class FineTunePanel(Panel):
    """Fine-tune the picked model with LoRA and watch the loss fall; Stop works while it trains.

    Training runs in a background thread (:meth:`FineTuneController.start`), so the kernel keeps handling
    widget messages; the chart redraws at most five times a second.

    Args:
        controller: the state (default: a new :class:`FineTuneController` over ``picker``).
        picker: the shared :class:`~runlora_nb.widgets.picker.PickerController`.

    Attributes:
        controller: the :class:`FineTuneController`.
        dataset, lr, steps, eval_interval, compare_peft: the inputs.
        start_button, stop_button, save_button, save_path: the actions.
        progress, status: the progress bar and the step / loss / tokens-per-second / ETA line.
        figure: one ``go.FigureWidget`` with a train-loss line and validation markers per backend.
        memory_figure: measured saved-tensor bytes and peak memory per step, with the memory ledger's
            predicted saved bytes and total as dashed lines.
        plans_html, samples_html, save_status, choice_html: what the panel shows.
    """

    def __init__(self, controller: FineTuneController | None = None, picker: Any = None) -> None:
        super().__init__()
        self.add_class("runlora-finetune")
        self.controller = controller or FineTuneController(picker)
        s = self.controller.settings
        self.dataset = widgets.Combobox(
            value=s.dataset,
            options=_dataset_names(),
            ensure_option=False,
            continuous_update=False,
            description="dataset",
            placeholder="name or .txt / .jsonl file",
            **_STYLE,
        )
        self.lr = widgets.BoundedFloatText(
            value=s.lr, min=1e-7, max=1.0, step=1e-4, description="lr (peak)", **_STYLE
        )
        self.steps = widgets.IntSlider(value=s.steps, min=1, max=2000, description="steps", **_STYLE)
        self.eval_interval = widgets.IntSlider(
            value=s.eval_interval, min=0, max=200, description="eval every", **_STYLE
        )
        self.compare_peft = widgets.Checkbox(
            value=s.compare_peft, description="then train with PEFT and overlay", indent=False
        )
        self.start_button = widgets.Button(description="Start", icon="play", button_style="success")
        self.stop_button = widgets.Button(
            description="Stop", icon="stop", button_style="danger", disabled=True
        )
        self.progress = widgets.IntProgress(value=0, min=0, max=max(s.steps, 1), description="progress")
        self.smoothing = widgets.FloatSlider(
            value=0.0, min=0.0, max=0.99, step=0.01, description="smoothing", **_STYLE
        )  # the train curves' exponential moving average (TensorBoard's); 0: raw losses
        self.log_y = widgets.ToggleButton(value=False, description="log scale", icon="line-chart")
        self.status = widgets.HTML()
        self.status.add_class("runlora-status")
        self.choice_html = widgets.HTML()
        self.figure = self._make_figure()
        self.memory_figure = self._make_memory_figure()
        self.plans_html = widgets.HTML()
        self.samples_html = widgets.HTML()
        self.save_path = widgets.Text(value="adapters/runlora-adapter", description="adapter dir", **_STYLE)
        self.save_button = widgets.Button(description="Save adapter", icon="save")
        self.save_status = widgets.HTML()
        self._traces: dict[tuple[str, str], int] = {}
        self._shown_plans: Any = None
        self._shown_samples: Any = None
        self._redraw = self.throttled(self._draw)

        for name in ("dataset", "lr", "steps", "eval_interval", "compare_peft"):
            self.on_change(getattr(self, name), lambda value, name=name: self._set(name, value))
        self.on_click(self.start_button, self.start)
        self.on_click(self.stop_button, self.stop)
        self.on_click(self.save_button, self.save)
        self.on_change(self.smoothing, lambda _v: self._draw())
        self.on_change(self.log_y, lambda _v: self._draw())
        self.add_cleanup(self.controller.subscribe(self.guard(self._on_event, where="fine-tune update")))
        self.add_cleanup(self.controller.stop)
        picker_ctl = self.controller.picker
        if picker_ctl is not None:
            self.add_cleanup(picker_ctl.subscribe(self.guard(lambda *_: self._show_choice(), where="picker")))

        self.children = [
            widgets.HTML("<b>Fine-tune</b> with the picked model and LoRA setting"),
            self.choice_html,
            widgets.HBox(
                [
                    widgets.VBox([self.dataset, self.lr, self.steps]),
                    widgets.VBox([self.eval_interval, self.compare_peft]),
                ]
            ),
            widgets.HBox([self.start_button, self.stop_button, self.progress]),
            self.status,
            widgets.HBox([self.smoothing, self.log_y]),
            self.figure,
            self.memory_figure,
            self.plans_html,
            self.samples_html,
            widgets.HBox([self.save_path, self.save_button]),
            self.save_status,
            self.errors.widget,
        ]
        self._show_choice()
        self._draw()

    # ----------------------------------------------------------------------------------------- figure
    def _make_figure(self) -> go.FigureWidget:
        fig = go.FigureWidget()
        fig.update_layout(
            width=860,
            height=360,
            margin={"l": 10, "r": 10, "t": 30, "b": 40},
            title={"text": "loss", "font": {"size": 13}},
            xaxis_title="step",
            yaxis_title="cross-entropy",
            legend={"orientation": "h", "y": 1.12, "x": 1, "xanchor": "right"},
        )
        return fig

    def _make_memory_figure(self) -> go.FigureWidget:
        fig = go.FigureWidget()
        fig.update_layout(
            width=860,
            height=260,
            margin={"l": 10, "r": 10, "t": 30, "b": 40},
            title={"text": "memory: measured (solid) against the memory ledger's prediction (dashed)",
                   "font": {"size": 13}},
            xaxis_title="step",
            yaxis_title="MiB",
            legend={"orientation": "h", "y": 1.2, "x": 1, "xanchor": "right"},
        )  # fmt: skip
        return fig

    def _memory_index(self, backend: str, kind: str) -> int:
        """One line per backend and kind: saved / peak (measured), saved? / total? (predicted)."""
        key = (backend, f"memory:{kind}")
        if key not in self._traces:
            color = BACKEND_COLORS.get(backend, "#1e88e5")
            predicted = kind.endswith("?")
            label = {"saved": "saved tensors", "peak": "peak", "saved?": "predicted saved",
                     "total?": "predicted total (lower bound)"}[kind]  # fmt: skip
            self.memory_figure.add_scatter(
                name=f"{backend} {label}", mode="lines",
                line={"color": color, "dash": "dash" if predicted else "solid",
                      "width": 1 if kind.startswith("total") or kind == "peak" else 2},
            )  # fmt: skip
            self._traces[key] = len(self.memory_figure.data) - 1
        return self._traces[key]

    def _draw_memory(self, runs: list[RunTrace]) -> None:
        mib = 2.0**20
        for run in runs:
            measured = measured_memory(run.history)
            for kind, values in (("saved", measured["saved_bytes"]), ("peak", measured["peak_bytes"])):
                line = self.memory_figure.data[self._memory_index(run.backend, kind)]
                line.x = measured["step"]
                line.y = [v / mib if v is not None else None for v in values]
            if run.memory is not None:
                span = [1, max(run.config.steps, 1)]
                for kind, value in (
                    ("saved?", run.memory.activation_bytes),
                    ("total?", run.memory.total_bytes),
                ):
                    line = self.memory_figure.data[self._memory_index(run.backend, kind)]
                    line.x, line.y = span, [value / mib] * 2

    def _trace_index(self, backend: str, kind: str) -> int:
        key = (backend, kind)
        if key not in self._traces:
            color = BACKEND_COLORS.get(backend, "#1e88e5")
            if kind == "train":
                self.figure.add_scatter(name=f"{backend} train", mode="lines", line={"color": color})
            else:
                self.figure.add_scatter(
                    name=f"{backend} validation",
                    mode="markers+lines",
                    line={"color": color, "dash": "dot"},
                    marker={"size": 8, "symbol": "diamond"},
                )
            self._traces[key] = len(self.figure.data) - 1
        return self._traces[key]

    def _draw(self) -> None:
        ctl = self.controller
        runs = list(ctl.runs)
        slots = [(self._trace_index(r.backend, "train"), self._trace_index(r.backend, "val")) for r in runs]
        for run in runs:  # traces are added outside batch_update, which defers new traces
            for kind in ("saved", "peak", *(("saved?", "total?") if run.memory is not None else ())):
                self._memory_index(run.backend, kind)
        with self.memory_figure.batch_update():
            self._draw_memory(runs)
        with self.figure.batch_update():  # traces are added above: batch_update defers new traces
            for run, (k_train, k_val) in zip(runs, slots):
                train, val = self.figure.data[k_train], self.figure.data[k_val]
                losses = list(run.losses)
                train.x = list(run.steps)
                train.y = ema(losses, self.smoothing.value) if self.smoothing.value > 0 else losses
                val.x, val.y = list(run.val_steps), list(run.val_losses)
            self.figure.update_yaxes(type="log" if self.log_y.value else "linear")
        p = ctl.progress()
        self.progress.max = max(p["total"], 1)
        self.progress.value = p["done"]
        self.status.value = self._status_text(runs, p)
        self.start_button.disabled = ctl.running
        self.stop_button.disabled = not ctl.running
        self._show_plans(runs)
        self._show_samples(runs)

    def _status_text(self, runs: list[RunTrace], p: dict[str, Any]) -> str:
        ctl = self.controller
        if ctl.error:
            return "<span style='color:#b00020'>training failed (see the error below)</span>"
        if not runs:
            return "<i>press Start</i>" if not ctl.running else "<i>loading the model and data…</i>"
        parts = []
        for run in runs:
            where = (
                f" on {html.escape(run.start.device)}" if run.start is not None and run.start.device else ""
            )
            line = f"<b>{run.backend}</b>{where}: "
            if run.end is not None:
                end = run.end
                if end.error:
                    line += f"failed at step {end.step}: {html.escape(end.error)}"
                elif end.stopped:
                    asked = run.stop_requested_at
                    line += f"stopped at step {end.step}" + (
                        f" (Stop pressed after step {asked})" if asked is not None else ""
                    )
                else:
                    line += f"done, {end.step} steps"
                line += f" in {fmt_seconds(end.elapsed_s)}; validation loss {_num(end.val_loss)}"
                if end.adapter_dir:
                    line += f"; adapter in <code>{html.escape(end.adapter_dir)}</code>"
            elif not run.steps:
                line += "preparing (model, data, first evaluation, sample)…"
            else:
                line += (
                    f"step {run.step}/{run.config.steps} · loss {run.losses[-1]:.4f} · "
                    f"{steady_tokens_per_s(run.tokens_per_s):,.0f} tokens/s"
                )
            if run.memory_error:
                line += f" · memory prediction failed: {html.escape(run.memory_error)}"
            parts.append(line)
        if ctl.running and p["eta_s"] is not None:
            parts.append(f"ETA {fmt_seconds(p['eta_s'])}")
        return "<br>".join(parts)

    def _show_plans(self, runs: list[RunTrace]) -> None:
        plans = next((r.plans for r in runs if r.plans is not None), None)
        if plans is self._shown_plans:
            return  # rendering the table once per run keeps the redraw cheap
        self._shown_plans = plans
        if plans is None or plans.empty:
            self.plans_html.value = ""
            return
        shown = plans[[c for c in PLAN_COLUMNS if c in plans.columns]]
        pairs = (plans["fwd"] + "+" + plans["bwd"]).value_counts()
        summary = ", ".join(f"{pair} × {n}" for pair, n in pairs.items())
        self.plans_html.value = (
            f"<details><summary><b>chain plan in use</b> (after step 1): {summary}</summary>"
            f"{df_html(shown)}</details>"
        )

    def _show_samples(self, runs: list[RunTrace]) -> None:
        key = tuple((r.backend, tuple((k, len(v)) for k, v in r.samples.items())) for r in runs)
        if key == self._shown_samples:
            return
        self._shown_samples = key
        rows = []
        for run in runs:
            for stage in ("before", "after"):
                for prompt, text in run.samples.get(stage, []):
                    rows.append(
                        f"<tr><td>{run.backend}</td><td>{stage}</td><td>{html.escape(prompt)}</td>"
                        f"<td><code>{html.escape(text)}</code></td></tr>"
                    )
        self.samples_html.value = (
            "<b>samples</b><table class='runlora-table'><tr><th>backend</th><th>stage</th><th>prompt</th>"
            f"<th>generation</th></tr>{''.join(rows)}</table>"
            if rows
            else ""
        )

    def _show_choice(self) -> None:
        picker = self.controller.picker
        if picker is None:
            c = self.controller.config()
            self.choice_html.value = f"<small>model {html.escape(c.model)}, r={c.r}</small>"
            return
        c = picker.choice
        targets = c.targets if isinstance(c.targets, str) else ", ".join(c.targets)
        self.choice_html.value = (
            f"<small>model <b>{html.escape(c.model)}</b> ({c.dtype}, quantization={c.quantization or 'none'}), "
            f"r={c.r}, alpha={c.alpha:g}, dropout={c.dropout:g}, targets {html.escape(targets)}, "
            f"batch {c.batch_size} × seq {c.seq_len} — change them in the model picker</small>"
        )

    # ----------------------------------------------------------------------------------------- actions
    def _set(self, name: str, value: Any) -> None:
        self.controller.set(**{name: value})
        self._redraw()

    def start(self) -> None:
        """Start training in the background (the Start button)."""
        self.save_status.value = ""
        self.controller.start()
        self._redraw.flush()

    def stop(self) -> None:
        """Stop after the current step (the Stop button)."""
        self.controller.stop()
        self._redraw()

    def save(self) -> None:
        """Save the runlora_nb adapter to the path in the text box (the Save button)."""
        path = self.controller.save_adapter(self.save_path.value)
        self.save_status.value = f"saved the adapter to <code>{html.escape(str(path))}</code>"

    def _on_event(self, kind: str, payload: Any) -> None:
        if kind == "error":
            self.errors.show(f"fine-tune: {payload}")
            self._redraw.flush()
        elif kind in ("end", "finished", "run"):
            self._redraw.flush()
        else:
            self._redraw()


def _num(x: float | None) -> str:
    return "–" if x is None or x != x else f"{x:.4f}"
