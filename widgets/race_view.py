"""ChainRace: the widgets over a :class:`~runlora_nb.widgets.race.RaceController`."""

from __future__ import annotations

import html
import math
import statistics
from typing import Any

import ipywidgets as widgets
import plotly.graph_objects as go
from IPython.display import HTML, FileLink
from plotly.subplots import make_subplots

from runlora_nb.app.report import COLORS

from ._frame_sync import FrameSync
from .chrome import Panel
from .formatting import df_html, fmt_seconds
from .lora_inputs import shape_sliders
from .picker import DTYPE_CHOICES
from .race import SOURCES, RaceController, devices

__all__ = ["KIND_COLORS", "ChainRace"]

KIND_COLORS = COLORS  # the HTML report's colours: floor / PEFT / plan / twin / pair
FRONTEND_WAIT_S = 2.0  # the longest a round waits for the browser to paint the previous one
SAVED_COLOR, PEAK_COLOR = "#8e24aa", "#d81b60"
_STYLE = {"style": {"description_width": "70px"}, "layout": widgets.Layout(width="330px")}

# trace indices of the race figure
TIME, SAVED, PEAK, SCATTER, DIAGONAL = range(5)


class ChainRace(Panel):
    """Race the chain pairs of one layer (or the picked model) and watch the bars fill in.

    Args:
        controller: the race state (default: a new :class:`RaceController` over ``picker``).
        picker: the shared :class:`~runlora_nb.widgets.picker.PickerController` (for ``source="model"``).

    Attributes:
        controller: the :class:`RaceController`.
        source, tokens, in_features, out_features, rank, dtype, dropout, reps: the inputs.
        race_button, cancel_button, export_button, csv_path: the actions.
        progress, status: the progress bar and its text.
        figure: one ``go.FigureWidget``: time bars with IQR error bars, saved-activation bars (plus the
            allocator peak on CUDA), and predicted vs measured time.
        table: ``Output`` with the result DataFrame; ``export_out`` shows the CSV link.
        noise_check: race the planner's layer against copies of itself (the machine's noise floor).
        frame_sync: the invisible :class:`~runlora_nb.widgets._frame_sync.FrameSync`: after each round the
            chart is drawn and the next round waits until the browser has painted it, so no redraw runs while
            a candidate is timed.
    """

    def __init__(self, controller: RaceController | None = None, picker: Any = None) -> None:
        super().__init__()
        self.add_class("runlora-race")
        self.controller = controller or RaceController(picker)
        s = self.controller.settings
        self.source = widgets.ToggleButtons(
            options=list(SOURCES),
            value=s.source,
            tooltips=["one layer of the shape below", "the model, batch and setting of the model picker"],
        )
        sliders = shape_sliders(s, _STYLE)
        self.tokens, self.in_features, self.out_features = (
            sliders["tokens"],
            sliders["in_features"],
            sliders["out_features"],
        )
        self.rank, self.dropout = sliders["rank"], sliders["dropout"]
        self.dtype = widgets.Dropdown(
            options=list(DTYPE_CHOICES), value=_short_dtype(s.dtype), description="dtype", **_STYLE
        )
        self.reps = widgets.IntSlider(value=s.reps, min=1, max=30, description="rounds", **_STYLE)
        self.device = widgets.Dropdown(options=devices(), value=s.device, description="device", **_STYLE)
        self.noise_check = widgets.Checkbox(
            value=s.noise_check,
            description="noise check",
            tooltip="race the planner's layer against three copies of itself: the spread is the machine's noise",
            indent=False,
        )
        self.frame_sync = FrameSync()
        self.race_button = widgets.Button(description="Race", icon="play", button_style="success")
        self.cancel_button = widgets.Button(description="Cancel", icon="stop", disabled=True)
        self.progress = widgets.IntProgress(value=0, min=0, max=1, description="progress")
        self.status = widgets.HTML()
        self.status.add_class("runlora-status")
        self.figure = self._make_figure()
        self.table = widgets.Output()
        self.csv_path = widgets.Text(value="chain_race.csv", description="CSV", **_STYLE)
        self.export_button = widgets.Button(description="Export CSV", icon="file")
        self.export_out = widgets.Output()
        self._redraw = self.throttled(self._draw)

        self.controller.set(
            tokens=self.tokens.value,
            in_features=self.in_features.value,
            out_features=self.out_features.value,
            rank=self.rank.value,
        )
        names = (
            "source",
            "tokens",
            "in_features",
            "out_features",
            "rank",
            "dtype",
            "dropout",
            "reps",
            "device",
            "noise_check",
        )
        for name in names:
            self.on_change(getattr(self, name), lambda value, name=name: self._set(name, value))
        self.on_click(self.race_button, self.start)
        self.on_click(self.cancel_button, self.controller.cancel)
        self.on_click(self.export_button, self.export)
        self.add_cleanup(self.controller.subscribe(self.guard(self._on_event, where="race update")))
        self.add_cleanup(self.controller.cancel)

        self.shape_box = widgets.VBox([self.tokens, self.in_features, self.out_features, self.rank])
        self.children = [
            widgets.HTML(
                "<b>Chain race</b>: every valid (forward, backward) chain pair, the planner's choice "
                "(<i>runlora</i>), PEFT and the frozen layer (the floor), interleaved round by round"
            ),
            self.source,
            widgets.HBox(
                [
                    self.shape_box,
                    widgets.VBox([self.dtype, self.dropout, self.reps, self.device, self.noise_check]),
                ]
            ),
            widgets.HBox([self.race_button, self.cancel_button, self.progress]),
            self.status,
            self.figure,
            self.table,
            widgets.HBox([self.csv_path, self.export_button]),
            self.export_out,
            self.errors.widget,
            self.frame_sync,
        ]
        self._show_source(s.source)
        self._draw()

    # ----------------------------------------------------------------------------------------- figure
    def _make_figure(self) -> go.FigureWidget:
        fig = make_subplots(
            rows=1,
            cols=3,
            column_widths=[0.42, 0.28, 0.30],
            horizontal_spacing=0.07,
            subplot_titles=(
                "forward + backward: median (IQR)",
                "saved for backward",
                "predicted vs measured",
            ),
        )
        fig.add_bar(
            name="median time",
            orientation="h",
            error_x={"type": "data", "symmetric": False, "array": [], "arrayminus": []},
            hoverinfo="text",
            row=1,
            col=1,
        )
        fig.add_bar(name="saved activations", orientation="h", marker_color=SAVED_COLOR, row=1, col=2)
        fig.add_bar(name="allocator peak", orientation="h", marker_color=PEAK_COLOR, row=1, col=2)
        fig.add_scatter(name="pairs", mode="markers", marker={"size": 9}, row=1, col=3)
        fig.add_scatter(
            name="y = x", mode="lines", line={"dash": "dot", "color": "#999"}, hoverinfo="skip", row=1, col=3
        )
        fig.update_yaxes(autorange="reversed", type="category", row=1, col=1)
        fig.update_yaxes(autorange="reversed", type="category", showticklabels=False, row=1, col=2)
        fig.update_xaxes(title_text="ms", rangemode="tozero", row=1, col=1)
        fig.update_xaxes(title_text="MiB", rangemode="tozero", row=1, col=2)
        fig.update_xaxes(title_text="predicted ms", row=1, col=3)
        fig.update_yaxes(title_text="measured ms", row=1, col=3)
        fig.update_layout(
            width=980,
            height=440,
            margin={"l": 10, "r": 10, "t": 40, "b": 40},
            showlegend=False,
            barmode="group",
        )
        return go.FigureWidget(fig)

    def _draw(self) -> None:
        ctl = self.controller
        ms = ctl.snapshot()
        names = [m.candidate for m in ms]
        ms_time = [m.median * 1e3 for m in ms]
        peaks = [m.peak_bytes for m in ms]
        pv = ctl.predicted_vs_measured()
        with self.figure.batch_update():
            quartiles = [_quartiles(m.samples) for m in ms]
            bars = self.figure.data[TIME]
            bars.y, bars.x = names, ms_time
            # the error bar spans the interquartile range: Q1 … Q3 around the median
            bars.error_x.array = [(q3 - m.median) * 1e3 for m, (_, q3) in zip(ms, quartiles)]
            bars.error_x.arrayminus = [(m.median - q1) * 1e3 for m, (q1, _) in zip(ms, quartiles)]
            bars.marker.color = [KIND_COLORS.get(m.kind, "#1e88e5") for m in ms]
            bars.hovertext = [
                f"{m.candidate}: median {fmt_seconds(m.median)}, IQR {fmt_seconds(q1)} … {fmt_seconds(q3)} "
                f"over {len(m.samples)} rounds"
                for m, (q1, q3) in zip(ms, quartiles)
            ]
            saved = self.figure.data[SAVED]
            saved.y, saved.x = names, [m.saved_bytes / 2**20 for m in ms]
            saved.marker.color = [SAVED_COLOR] * len(ms)
            peak = self.figure.data[PEAK]
            has_peak = any(p is not None for p in peaks)
            peak.y = names if has_peak else []
            peak.x = [(p or 0) / 2**20 for p in peaks] if has_peak else []
            peak.marker.color = [PEAK_COLOR] * len(ms) if has_peak else []
            predicted, measured = list(pv["predicted_s"] * 1e3), list(pv["median_s"] * 1e3)
            scatter = self.figure.data[SCATTER]
            scatter.x, scatter.y = predicted, measured
            scatter.text = list(pv["candidate"])
            scatter.hovertemplate = "%{text}: predicted %{x:.3g} ms, measured %{y:.3g} ms<extra></extra>"
            scatter.marker.color = [KIND_COLORS.get(k, "#1e88e5") for k in pv["kind"]]
            both = predicted + measured
            diagonal = self.figure.data[DIAGONAL]
            diagonal.x = diagonal.y = [min(both), max(both)] if both else []
        self.progress.max = max(ctl.total, 1)
        self.progress.value = min(ctl.received, self.progress.max)
        self.status.value = self._status_text()
        running = ctl.running
        self.race_button.disabled = running
        self.cancel_button.disabled = not running

    def _status_text(self) -> str:
        ctl = self.controller
        if ctl.error:
            return "<span style='color:#b00020'>the race failed (see the error below)</span>"
        if ctl.ran is None:
            return f"<i>ready: {ctl.describe()}</i>"
        if ctl.result is not None:
            how = "cancelled" if ctl.cancelled else "done"
            best = ctl.result.iloc[0]["candidate"] if len(ctl.result) else "–"
            notes = "".join(
                f"<br><span style='color:#b26a00'>⚠ {html.escape(n)}</span>"
                for n in ctl.result.attrs.get("notes", ())
            )
            return f"<b>{how}</b>: {ctl.describe()}; fastest: <b>{best}</b>{notes}"
        if not ctl.received:
            return f"<i>preparing candidates and warming up: {ctl.describe()}…</i>"
        return f"racing: {ctl.received} of {ctl.total} measurements"

    # ----------------------------------------------------------------------------------------- actions
    def _set(self, name: str, value: Any) -> None:
        self.controller.set(**{name: value})
        if name == "source":
            self._show_source(value)
        self._redraw()

    def _show_source(self, source: str) -> None:
        self.shape_box.layout.display = "none" if source == "model" else "flex"

    def start(self) -> None:
        """Start a race in the background (the Race button).

        Raises:
            RuntimeError: the panel was closed (its chart and status are gone; nothing would show the race).
        """
        if self.closed:
            raise RuntimeError(
                "ChainRace.start: this panel was closed, so a race would draw nowhere; make a new "
                "ChainRace(controller) or call controller.run() directly"
            )
        self.table.outputs = ()
        self.controller.start()
        self._redraw.flush()

    def cancel(self) -> None:
        """Cancel the running race (the Cancel button)."""
        self.controller.cancel()

    def export(self) -> None:
        """Write the table to the CSV path and show a link to it (the Export button)."""
        path = self.controller.export_csv(self.csv_path.value)
        self.export_out.outputs = ()
        self.export_out.append_display_data(FileLink(str(path), result_html_prefix="wrote "))

    def _on_event(self, kind: str, payload: Any) -> None:
        if kind in ("done", "error"):
            self._redraw.flush()
            if kind == "error":
                self.errors.show(f"race: {payload}")
            else:
                self._show_table()
        elif kind == "round":
            # between two rounds, in the race thread: draw now and let the next round start only once the
            # browser has painted it (nothing of ours runs while a candidate is timed)
            self._redraw.flush()
            self.frame_sync.wait(FRONTEND_WAIT_S)
        # "started": start() draws at once; "measurement": drawn at the end of its round, never from a timer during a timed call

    def _show_table(self) -> None:
        ctl = self.controller
        self.table.outputs = ()
        self.table.append_display_data(ctl.live_table())
        if ctl.plans is not None and len(ctl.plans):
            cols = ["module", "in_features", "out_features", "fwd", "bwd", "gflops", "predicted_ms"]
            plans = ctl.plans[[c for c in cols if c in ctl.plans]]
            self.table.append_display_data(HTML("<b>chain plan per module</b>" + df_html(plans)))


def _quartiles(samples: tuple[float, ...]) -> tuple[float, float]:
    """(Q1, Q3) the way :attr:`runlora_nb.measure.Measurement.iqr` computes them."""
    if len(samples) < 2:
        return (samples[0], samples[0]) if samples else (math.nan, math.nan)
    q = statistics.quantiles(samples, n=4, method="inclusive")
    return q[0], q[2]


def _short_dtype(dtype: str) -> str:
    return {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}.get(dtype, dtype)
