"""LoRALab: the teaching panel over a :class:`~runlora_nb.widgets.lab.LabController`."""

from __future__ import annotations

import html
from collections.abc import Callable

import ipywidgets as widgets
import pandas as pd
import plotly.graph_objects as go
from plotly.colors import qualitative
from plotly.subplots import make_subplots

from .adapter_xray_view import XraySection
from .chrome import Panel
from .formatting import df_html, fmt_bytes
from .lab import ALL_PAIRS, PROXY, LabController, warm_up
from .lora_inputs import shape_sliders
from .tasks import BackgroundTask

__all__ = ["LoRALab"]

_STYLE = {"style": {"description_width": "90px"}, "layout": widgets.Layout(width="340px")}
PAIR_COLORS = {p: qualitative.Plotly[k % len(qualitative.Plotly)] for k, p in enumerate(ALL_PAIRS)}
BARS, HEATMAP, HERE = range(3)  # trace indices


def _discrete_colorscale() -> list[list]:
    """Piecewise-constant colorscale: value k (of the pairs 0 … n-1) gets the k-th pair's color."""
    n = len(ALL_PAIRS)
    scale = []
    for k, pair in enumerate(ALL_PAIRS):
        scale += [[k / n, PAIR_COLORS[pair]], [(k + 1) / n, PAIR_COLORS[pair]]]
    return scale


class LoRALab(Panel):
    """Move the sliders and see, at once, what each chain pair costs and what each library keeps.

    Args:
        controller: the state (default: a new :class:`LabController`).
        xray_runs: returns the fine-tune's runs, for the X-ray section's "last fine-tune" (None: folders only).

    Attributes:
        controller: the :class:`LabController`.
        tokens, in_features, out_features, rank, dropout, x_needs_grad: the inputs.
        figure: one ``go.FigureWidget``: GFLOPs per valid pair (the chosen one in green) and the (N, r) map of
            the fewest-FLOP pair, with the current (N, r) marked.
        formula: the chosen pair, its formulas and the planner's reason.
        peft_table, runlora_table: the tensors each keeps for backward, with bytes.
        xray: the :class:`~runlora_nb.widgets.adapter_xray_view.XraySection` (what each adapter learnt).
    """

    def __init__(
        self, controller: LabController | None = None, xray_runs: Callable[[], list] | None = None
    ) -> None:
        super().__init__()
        self.add_class("runlora-lab")
        self.controller = controller or LabController()
        s = self.controller.settings
        sliders = shape_sliders(s, _STYLE)
        self.tokens, self.in_features, self.out_features = (
            sliders["tokens"],
            sliders["in_features"],
            sliders["out_features"],
        )
        self.rank, self.dropout = sliders["rank"], sliders["dropout"]
        self.x_needs_grad = widgets.Checkbox(value=s.x_needs_grad, description="X needs grad", indent=False)
        self.formula = widgets.HTML()
        self.figure = self._make_figure()
        self.peft_table = widgets.HTML(layout=widgets.Layout(margin="0 32px 0 0"))
        self.runlora_table = widgets.HTML()
        self.saved_note = widgets.HTML()
        self.xray = XraySection(self, xray_runs)
        self._redraw = self.throttled(self._draw)
        self.task = BackgroundTask("runlora-lab", on_error=lambda tb: self.errors.show(f"lab warm-up: {tb}"))

        self.controller.set(
            tokens=self.tokens.value,
            in_features=self.in_features.value,
            out_features=self.out_features.value,
            rank=self.rank.value,
        )
        for name in ("tokens", "in_features", "out_features", "rank", "dropout", "x_needs_grad"):
            self.on_change(getattr(self, name), lambda value, name=name: self._set(name, value))

        self.children = [
            widgets.HTML(
                "<b>LoRA lab</b>: FLOPs of every chain pair and what is kept for backward, computed from the "
                "shapes (no timing)"
            ),
            widgets.HBox(
                [
                    widgets.VBox([self.tokens, self.in_features, self.out_features]),
                    widgets.VBox([self.rank, self.dropout, self.x_needs_grad]),
                ]
            ),
            self.formula,
            self.figure,
            widgets.HTML("<b>kept for backward</b> (one layer)"),
            widgets.HBox([self.peft_table, self.runlora_table]),
            self.saved_note,
            self.xray,
            self.errors.widget,
        ]
        self._draw()
        if not self.controller.saved_ready():
            self.task.start(self._warm_up)

    def _warm_up(self) -> None:
        warm_up()
        self._redraw.flush()

    # ----------------------------------------------------------------------------------------- figure
    def _make_figure(self) -> go.FigureWidget:
        fig = make_subplots(
            rows=1,
            cols=2,
            column_widths=[0.5, 0.5],
            horizontal_spacing=0.12,
            subplot_titles=("GFLOPs of forward + backward per pair", "fewest-FLOP pair over (N, r)"),
        )
        fig.add_bar(name="GFLOPs", row=1, col=1)
        fig.add_heatmap(
            name="winner",
            colorscale=_discrete_colorscale(),
            zmin=-0.5,
            zmax=len(ALL_PAIRS) - 0.5,
            colorbar={
                "tickvals": list(range(len(ALL_PAIRS))),
                "ticktext": list(ALL_PAIRS),
                "len": 1.0,
                "thickness": 12,
            },
            hovertemplate="N=%{x}, r=%{y}: %{text}<extra></extra>",
            xgap=1,
            ygap=1,
            row=1,
            col=2,
        )
        fig.add_scatter(
            name="current",
            mode="markers",
            marker={"symbol": "x", "size": 14, "color": "black", "line": {"width": 2, "color": "white"}},
            hoverinfo="skip",
            row=1,
            col=2,
        )
        fig.update_xaxes(type="category", tickangle=-45, row=1, col=1)
        fig.update_yaxes(title_text="GFLOPs", rangemode="tozero", row=1, col=1)
        fig.update_xaxes(type="category", title_text="N tokens", row=1, col=2)
        fig.update_yaxes(type="category", title_text="rank r", row=1, col=2)
        fig.update_layout(
            width=980, height=400, margin={"l": 10, "r": 10, "t": 40, "b": 60}, showlegend=False
        )
        return go.FigureWidget(fig)

    def _draw(self) -> None:
        ctl = self.controller
        s = ctl.settings
        pairs = ctl.pairs()
        wmap = ctl.winner_map()
        with self.figure.batch_update():
            bars = self.figure.data[BARS]
            bars.x = list(pairs["pair"])
            bars.y = list(pairs["gflops"])
            bars.marker.color = ["#2e7d32" if c else "#90a4ae" for c in pairs["chosen"]]
            bars.hovertext = [f"{p}: {f:,d} FLOPs" for p, f in zip(pairs["pair"], pairs["flops"])]
            heat = self.figure.data[HEATMAP]
            heat.x = [str(n) for n in wmap.tokens]
            heat.y = [str(r) for r in wmap.ranks]
            heat.z = [[ALL_PAIRS.index(name) for name in row] for row in wmap.names]
            heat.text = [list(row) for row in wmap.names]
            here = self.figure.data[HERE]
            here.x, here.y = [str(s.tokens)], [str(s.rank)]
        e = ctl.explain()
        worst = pairs["flops"].max()
        self.formula.value = (
            f"<div style='line-height:1.6'>chosen pair (fewest FLOPs, planner mode='flops'): <b>{e['pair']}</b> — "
            f"{e['gflops']} GFLOP ({worst / max(pairs['flops'].min(), 1):.2f}× fewer than the worst valid pair)"
            f"<br>forward: <code>{html.escape(e['forward'])}</code>"
            f"<br>backward: <code>{html.escape(e['backward'])}</code>"
            f"<br><small>{html.escape(e['reason'])}; needs {s.needs.label()}</small></div>"
        )
        self._draw_saved()

    def _draw_saved(self) -> None:
        ctl = self.controller
        if not ctl.saved_ready():
            self.peft_table.value = self.runlora_table.value = "<i>recording the saved tensors…</i>"
            return
        df = ctl.saved_tensors()
        for backend, target, title in (
            ("peft", self.peft_table, "PEFT"),
            ("runlora", self.runlora_table, "runlora_nb"),
        ):
            rows = df[df["backend"] == backend]
            acts = int(rows.loc[rows["kind"] != "parameter", "bytes"].sum())
            table = pd.DataFrame(
                {
                    "tensor": rows["tensor"],
                    "shape": rows["shape"],
                    "bytes": rows["bytes"].map(fmt_bytes),
                    "kind": rows["kind"],
                }
            )
            target.value = f"<b>{title}</b>: activations {fmt_bytes(acts)}" + df_html(table)
        totals = ctl.saved_totals()
        ratio = totals["peft"] / totals["runlora"] if totals["runlora"] else float("nan")
        p = PROXY
        self.saved_note.value = (
            f"<small>PEFT keeps {ratio:.2f}× the activation bytes of runlora_nb here. Tensors recorded with "
            f"saved_tensors_hooks on a proxy layer (N={p['N']}, i={p['i']}, o={p['o']}, r={p['r']}, fp32); "
            "bytes computed for the chosen shape. Parameters are kept by reference (no extra memory).</small>"
        )

    # ----------------------------------------------------------------------------------------- actions
    def _set(self, name: str, value) -> None:
        self.controller.set(**{name: value})
        self._redraw()
