"""ChatPanel: A/B chat, a thin view over :class:`runlora_nb.assess.chat.ChatAB` (streamed, Stop works)."""

from __future__ import annotations

import html
from typing import Any

import ipywidgets as widgets

from runlora_nb.assess.chat import ChatAB

from .chrome import Panel

__all__ = ["ChatPanel"]

_STYLE = {"style": {"description_width": "110px"}, "layout": widgets.Layout(width="360px")}
_COLUMN = (
    "<div style='white-space:pre-wrap;border:1px solid #ddd;border-radius:4px;padding:6px;min-height:80px'>"
    "{}</div>"
)


class ChatPanel(Panel):
    """The same prompt to both sides (base and tuned, or two adapters), answers streamed side by side.

    Generation runs in the controller's background thread, so the kernel keeps handling widget messages and Stop
    ends the answer at the next token.

    Args:
        controller: a :class:`ChatAB`; or build one from ``tokenizer`` and ``model`` / ``sides``.

    Attributes:
        prompt, max_new_tokens, do_sample, temperature: the inputs; send_button, stop_button: the actions.
        columns: side → HTML widget with the answer so far; status: the progress line.
    """

    def __init__(self, controller: ChatAB | None = None, **chat: Any) -> None:
        super().__init__()
        self.add_class("runlora-chat")
        self.controller = controller or ChatAB(**chat)
        s = self.controller.settings
        self.prompt = widgets.Textarea(
            placeholder="a prompt for both sides", layout=widgets.Layout(width="900px", height="70px")
        )
        self.max_new_tokens = widgets.IntSlider(
            value=s.max_new_tokens, min=1, max=512, description="new tokens", **_STYLE
        )
        self.do_sample = widgets.Checkbox(value=s.do_sample, description="sample (else greedy)", indent=False)
        self.temperature = widgets.FloatSlider(
            value=s.temperature, min=0.05, max=2.0, step=0.05, description="temperature", **_STYLE
        )
        self.send_button = widgets.Button(description="Send", icon="paper-plane", button_style="success")
        self.stop_button = widgets.Button(description="Stop", icon="stop", disabled=True)
        self.status = widgets.HTML("<i>type a prompt and press Send</i>")
        self.status.add_class("runlora-status")
        self.columns = {name: widgets.HTML(_COLUMN.format("")) for name in self.controller.sides}
        self._redraw = self.throttled(self._draw)
        for name in ("max_new_tokens", "do_sample", "temperature"):
            self.on_change(getattr(self, name), lambda v, name=name: self.controller.set(**{name: v}))
        self.on_click(self.send_button, self.send)
        self.on_click(self.stop_button, self.controller.stop)
        self.add_cleanup(self.controller.subscribe(self.guard(self._on_event, where="chat update")))
        self.add_cleanup(self.controller.stop)
        boxes = [
            widgets.VBox(
                [widgets.HTML(f"<b>{html.escape(name)}</b>"), col], layout=widgets.Layout(width="450px")
            )
            for name, col in self.columns.items()
        ]
        self.children = [
            widgets.HTML("<b>Chat A/B</b>: one prompt, two models, answers streamed"),
            self.prompt,
            widgets.HBox([self.max_new_tokens, self.do_sample, self.temperature]),
            widgets.HBox([self.send_button, self.stop_button]),
            self.status,
            widgets.HBox(boxes),
            self.errors.widget,
        ]

    def send(self) -> None:
        """Start both answers (the Send button)."""
        if self.closed:
            raise RuntimeError("ChatPanel: this panel was closed; display a new one")
        self.errors.clear()
        self.controller.start(self.prompt.value)
        self.send_button.disabled, self.stop_button.disabled = True, False
        self._draw()

    def _on_event(self, kind: str, payload: Any) -> None:
        if kind in ("done", "error", "side_done"):
            self._redraw.flush()
            if kind == "error":
                self.errors.show(f"chat: {payload}")
        else:
            self._redraw()

    def _draw(self) -> None:
        ctl = self.controller
        for name, col in self.columns.items():
            col.value = _COLUMN.format(html.escape(ctl.texts.get(name, "")))
        running = ctl.running and not (ctl.results.keys() >= ctl.sides.keys()) and not ctl.error
        self.send_button.disabled, self.stop_button.disabled = running, not running
        done = [
            f"{html.escape(r.side)}: {r.new_tokens} tokens, {r.tokens_per_s:.1f} tokens/s"
            + (" (stopped)" if r.stopped else "")
            for r in ctl.results.values()
        ]
        now = [
            f"{html.escape(n)}: {k} tokens…" for n, k in ctl.generated.items() if k and n not in ctl.results
        ]
        self.status.value = (
            " · ".join(done + (now if running else [])) or "<i>type a prompt and press Send</i>"
        )
