"""What every panel is made of: the :class:`Panel` box, its :class:`ErrorArea`, :class:`ChoiceButtons`, and
closing a widget tree.

Every panel is a :class:`Panel` (an ``ipywidgets.VBox``) with an :class:`ErrorArea`; every callback it registers
goes through :meth:`Panel.guard`, so an exception lands in that area as a traceback instead of in the kernel's
log, and the panel keeps working.
"""

from __future__ import annotations

import functools
import html
import threading
import traceback
from collections.abc import Callable, Iterable
from typing import Any

import ipywidgets as widgets
import traitlets

from .tasks import REDRAW_INTERVAL_S, Throttle

__all__ = ["ChoiceButtons", "ErrorArea", "Panel", "close_tree"]


class ErrorArea:
    """Where a panel shows the tracebacks of its failed callbacks (thread-safe).

    Attributes:
        widget: the box to place in the panel (hidden while there is nothing to show).
        messages: every report so far, oldest first (``"where: traceback"``).
    """

    def __init__(self, keep: int = 3) -> None:
        self.keep = keep
        self.messages: list[str] = []
        self._lock = threading.Lock()
        self.html = widgets.HTML()
        self.clear_button = widgets.Button(description="Clear errors", button_style="warning")
        self.clear_button.on_click(lambda _b: self.clear())
        self.widget = widgets.VBox([self.html, self.clear_button], layout=widgets.Layout(display="none"))
        self.widget.add_class("runlora-errors")

    def report(self, where: str, exc: BaseException | None = None) -> str:
        """Record an exception (default: the one being handled) and show it; returns the text shown."""
        if exc is None:
            text = traceback.format_exc()
        else:
            text = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
        return self.show(f"{where}: {text}")

    def show(self, text: str) -> str:
        """Show an error text (e.g. a traceback a background job already formatted)."""
        with self._lock:
            self.messages.append(text)
            shown = self.messages[-self.keep :]
            self.html.value = "".join(
                "<pre style='color:#b00020;white-space:pre-wrap;font-size:11px;margin:2px 0'>"
                f"{html.escape(m)}</pre>"
                for m in shown
            )
            self.widget.layout.display = "flex"
        return text

    def clear(self) -> None:
        with self._lock:
            self.messages.clear()
            self.html.value = ""
            self.widget.layout.display = "none"

    @property
    def text(self) -> str:
        """Everything reported so far, joined."""
        with self._lock:
            return "\n".join(self.messages)


class ChoiceButtons(widgets.HBox):
    """One toggle button per option, where an option can be disabled with a reason shown next to the row.

    ``ipywidgets.Dropdown`` cannot disable single options; this can. ``value`` is the selected option (a
    plain traitlet: observe it like any widget value). Setting a disabled option raises ``TraitError`` with
    the reason.

    Args:
        options: option labels, in order.
        value: initial selection.
        reasons: ``{option: reason}`` for options that cannot be chosen (None: available).
        description: label before the buttons.
    """

    value = traitlets.Unicode()

    def __init__(
        self,
        options: Iterable[str],
        value: str,
        reasons: dict[str, str | None] | None = None,
        description: str = "",
    ) -> None:
        self.reasons: dict[str, str] = {}
        self.buttons: dict[str, widgets.ToggleButton] = {}
        for option in options:
            button = widgets.ToggleButton(
                description=option, value=option == value, layout=widgets.Layout(width="auto")
            )
            button.observe(functools.partial(self._toggled, option), names="value")
            self.buttons[option] = button
        self.note = widgets.HTML()
        label = widgets.Label(description, layout=widgets.Layout(width="90px")) if description else None
        children = [label] if label else []
        super().__init__([*children, *self.buttons.values(), self.note])
        self.set_reasons(reasons or {})
        self.value = value

    def set_reasons(self, reasons: dict[str, str | None]) -> None:
        """Disable the options that have a reason (shown next to the buttons), enable the others.

        Raises:
            traitlets.TraitError: the selected option would become disabled.
        """
        reasons = {k: v for k, v in reasons.items() if v}
        if self.value in reasons:
            raise traitlets.TraitError(f"{self.value!r} is selected and cannot be disabled")
        self.reasons = reasons
        for option, button in self.buttons.items():
            reason = reasons.get(option)
            button.disabled = reason is not None
            button.tooltip = f"{option} unavailable: {reason}" if reason else option
        notes = "; ".join(f"<b>{k}</b>: {html.escape(v)}" for k, v in reasons.items())
        self.note.value = f"<small style='color:#777'>{notes}</small>" if notes else ""

    @traitlets.validate("value")
    def _check(self, proposal):
        option = proposal["value"]
        if option not in self.buttons:
            raise traitlets.TraitError(f"{option!r} is not one of {list(self.buttons)}")
        if option in self.reasons:
            raise traitlets.TraitError(f"{option!r} cannot run on this machine: {self.reasons[option]}")
        return option

    @traitlets.observe("value")
    def _show(self, change) -> None:
        for option, button in self.buttons.items():
            button.value = option == change["new"]

    def _toggled(self, option: str, change) -> None:
        if change["new"]:
            self.value = option
        elif self.value == option:
            self.buttons[option].value = True  # one option is always selected


def close_tree(widget: widgets.Widget) -> None:
    """Close ``widget`` and every widget below it (``children``), panels through their own ``close``."""
    for child in list(getattr(widget, "children", ())):
        close_tree(child)
    widget.close()


class Panel(widgets.VBox):
    """Base of the panels: an error area, guarded callbacks, throttled redraws and a thorough ``close``."""

    def __init__(self, **kwargs: Any) -> None:
        self.errors = ErrorArea()
        self._throttles: list[Throttle] = []
        self._cleanups: list[Callable[[], None]] = []
        self.closed = False
        super().__init__(**kwargs)

    def guard(self, fn: Callable[..., Any], where: str | None = None) -> Callable[..., Any]:
        """``fn`` wrapped so that an exception is shown in this panel's error area (and returns None)."""
        label = where or getattr(fn, "__name__", "callback")

        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            try:
                return fn(*args, **kwargs)
            except Exception:
                self.errors.report(label)
                return None

        return wrapper

    def on_click(self, button: widgets.Button, fn: Callable[[], Any]) -> None:
        """Run ``fn()`` when ``button`` is clicked, guarded."""
        button.on_click(self.guard(lambda _b: fn(), where=f"{button.description or 'button'} click"))

    def on_change(self, widget: widgets.Widget, fn: Callable[[Any], Any], name: str = "value") -> None:
        """Run ``fn(new value)`` when ``widget.<name>`` changes, guarded."""
        widget.observe(self.guard(lambda change: fn(change["new"]), where=f"{name} change"), names=name)

    def throttled(self, fn: Callable[[], Any], interval: float = REDRAW_INTERVAL_S) -> Throttle:
        """A guarded :class:`Throttle` of ``fn`` that :meth:`close` cancels."""
        throttle = Throttle(self.guard(fn), interval)
        self._throttles.append(throttle)
        return throttle

    def add_cleanup(self, fn: Callable[[], None]) -> None:
        """Run ``fn`` in :meth:`close` (e.g. unsubscribe from a shared controller, cancel a job)."""
        self._cleanups.append(fn)

    def close(self) -> None:
        """Stop timers and jobs, unsubscribe, and close every widget of the panel."""
        if self.closed:
            return
        self.closed = True
        for throttle in self._throttles:
            throttle.close()
        for fn in self._cleanups:
            try:
                fn()
            except Exception:
                self.errors.report("close")
        for child in list(self.children):
            close_tree(child)
        close_tree(self.errors.widget)
        super().close()
