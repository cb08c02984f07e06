"""Plumbing shared by the panels: rate-limited redraws, error capture, background work and closing.

Nothing here knows about LoRA. Every panel is a :class:`Panel` (an ``ipywidgets.VBox``) with an
:class:`ErrorArea`; every callback it registers goes through :meth:`Panel.guard`, so an exception lands in that
area as a traceback instead of in the kernel's log, and the panel keeps working.
"""

from __future__ import annotations

import functools
import html
import math
import threading
import time
import traceback
from collections.abc import Callable, Iterable
from typing import Any

import ipywidgets as widgets
import pandas as pd
import traitlets

__all__ = [
    "REDRAW_INTERVAL_S",
    "BackgroundTask",
    "ChoiceButtons",
    "ErrorArea",
    "Listeners",
    "Panel",
    "Throttle",
    "close_tree",
    "df_html",
    "fmt_bytes",
    "fmt_count",
    "fmt_seconds",
    "quiet_imports",
]

REDRAW_INTERVAL_S = 0.2  # charts redraw at most five times a second


# ---------------------------------------------------------------------------------------------- formatting


def fmt_bytes(n: float | None) -> str:
    """``1536`` → ``"1.5 KiB"``; None or NaN → ``"–"``."""
    if n is None or (isinstance(n, float) and math.isnan(n)):
        return "–"
    n = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def fmt_seconds(s: float | None) -> str:
    """Seconds as ``"812 µs"``, ``"3.4 ms"``, ``"2.5 s"`` or ``"3 min 20 s"``; None or NaN → ``"–"``."""
    if s is None or math.isnan(s):
        return "–"
    if s < 1e-3:
        return f"{s * 1e6:.0f} µs"
    if s < 1:
        return f"{s * 1e3:.1f} ms"
    if s < 120:
        return f"{s:.1f} s"
    return f"{int(s // 60)} min {int(s % 60)} s"


def fmt_count(n: int) -> str:
    """``134515008`` → ``"134.5 M"``."""
    for limit, unit in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(n) >= limit:
            return f"{n / limit:.1f} {unit}"
    return str(int(n))


def df_html(df: pd.DataFrame, *, max_rows: int = 60, floatfmt: str = "{:.4g}") -> str:
    """A compact HTML table of ``df`` (numbers shortened, index hidden)."""
    if df is None or df.empty:
        return "<i>nothing yet</i>"
    shown = df.head(max_rows)
    table = shown.to_html(
        index=False,
        border=0,
        float_format=lambda v: floatfmt.format(v),
        na_rep="–",
        classes="runlora-table",
    )
    more = f"<div><i>… {len(df) - max_rows} more rows</i></div>" if len(df) > max_rows else ""
    style = (
        "<style>.runlora-table{border-collapse:collapse;font-size:12px}"
        ".runlora-table td,.runlora-table th{padding:2px 8px;text-align:right}"
        ".runlora-table tr:nth-child(even){background:rgba(127,127,127,.08)}</style>"
    )
    return style + table + more


_imported = threading.Event()
_import_lock = threading.Lock()


def quiet_imports() -> None:
    """Import peft (and with it transformers and bitsandbytes) once, under a lock, with their import-time
    chatter silenced.

    Every background job of the panels calls this first: transformers' lazy module is not safe to import from
    two threads at once (a second thread can see a half-initialised module and fail with "cannot import
    name"), and a job's first PEFT layer would otherwise print bitsandbytes' warnings into the notebook.
    """
    if _imported.is_set():
        return
    with _import_lock:
        if _imported.is_set():
            return
        from runlora_nb.assets.zoo import quiet_transformers

        with quiet_transformers():
            import peft  # noqa: F401
            import transformers

            transformers.PreTrainedTokenizerFast  # noqa: B018  (resolve the lazy names the zoo uses)
            transformers.AutoModelForCausalLM  # noqa: B018
        _imported.set()


# ---------------------------------------------------------------------------------------------- errors


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


# ---------------------------------------------------------------------------------------------- throttling


class Throttle:
    """Call ``fn`` at most once per ``interval`` seconds; a call inside the window runs once when it ends.

    Many calls in quick succession (a burst of measurements, one per training step) become one immediate call
    and one trailing call that sees the latest state, so a chart is never more than ``interval`` behind.
    ``fn`` never runs twice at the same time. Safe to call from any thread.

    Args:
        fn: what to run (takes no arguments).
        interval: minimum seconds between the starts of two runs.
    """

    def __init__(self, fn: Callable[[], Any], interval: float = REDRAW_INTERVAL_S) -> None:
        self.fn = fn
        self.interval = interval
        self.runs = 0
        self._lock = threading.Lock()
        self._run_lock = threading.Lock()
        self._last = -math.inf
        self._timer: threading.Timer | None = None
        self._firing = 0  # trailing runs in progress
        self._closed = False

    def __call__(self) -> None:
        with self._lock:
            if self._closed or self._timer is not None:
                return  # a trailing run is already scheduled and will see this state
            wait = self._last + self.interval - time.monotonic()
            if wait > 0:
                self._timer = threading.Timer(wait, self._fire)
                self._timer.daemon = True
                self._timer.start()
                return
            self._last = time.monotonic()
        self._run()

    def _fire(self) -> None:
        with self._lock:
            self._timer = None
            if self._closed:
                return
            self._last = time.monotonic()
            self._firing += 1
        try:
            self._run()
        finally:
            with self._lock:
                self._firing -= 1

    def _run(self) -> None:
        with self._run_lock:
            self.runs += 1
            self.fn()

    def flush(self) -> None:
        """Run now (dropping a scheduled trailing run): the final state of a job is drawn at once."""
        with self._lock:
            if self._closed:
                return
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None
            self._last = time.monotonic()
        self._run()

    @property
    def pending(self) -> bool:
        """A trailing run is scheduled or still running (its result is not drawn yet)."""
        return self._timer is not None or self._firing > 0

    def close(self) -> None:
        """Cancel a scheduled run; later calls do nothing."""
        with self._lock:
            self._closed = True
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None


# ---------------------------------------------------------------------------------------------- threads


class Listeners:
    """A list of ``fn(kind, payload)`` callbacks that a controller notifies (from whichever thread it is on).

    A failing listener does not stop the others nor the controller: its exception goes to ``on_error``
    (default: re-raised after the others ran).
    """

    def __init__(self) -> None:
        self._fns: list[Callable[[str, Any], None]] = []
        self._lock = threading.Lock()

    def subscribe(self, fn: Callable[[str, Any], None]) -> Callable[[], None]:
        """Add ``fn``; returns a function that removes it."""
        with self._lock:
            self._fns.append(fn)

        def unsubscribe() -> None:
            with self._lock:
                if fn in self._fns:
                    self._fns.remove(fn)

        return unsubscribe

    def notify(self, kind: str, payload: Any = None) -> None:
        with self._lock:
            fns = list(self._fns)
        first: BaseException | None = None
        for fn in fns:
            try:
                fn(kind, payload)
            except Exception as exc:
                first = first or exc
        if first is not None:
            raise first

    def __len__(self) -> int:
        return len(self._fns)


class BackgroundTask:
    """Run one job at a time in a daemon thread, so the kernel keeps handling widget messages.

    Args:
        name: thread name.
        on_error: called with the formatted traceback when the job raises (from the job's thread).
    """

    def __init__(self, name: str, on_error: Callable[[str], None] | None = None) -> None:
        self.name = name
        self.on_error = on_error
        self.thread: threading.Thread | None = None
        self.error: str | None = None

    @property
    def running(self) -> bool:
        return self.thread is not None and self.thread.is_alive()

    def start(self, fn: Callable[[], Any]) -> threading.Thread:
        """Start ``fn`` in a new thread.

        Raises:
            RuntimeError: the previous job is still running.
        """
        if self.running:
            raise RuntimeError(f"{self.name}: a job is already running; wait for it or cancel it first")
        self.error = None

        def target() -> None:
            try:
                fn()
            except Exception:
                self.error = traceback.format_exc()
                if self.on_error is not None:
                    self.on_error(self.error)

        self.thread = threading.Thread(target=target, name=self.name, daemon=True)
        self.thread.start()
        return self.thread

    def join(self, timeout: float | None = None) -> bool:
        """Wait for the job; True if it has finished."""
        if self.thread is not None:
            self.thread.join(timeout)
        return not self.running


# ---------------------------------------------------------------------------------------------- widgets


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


# ------------------------------------------------------------------------------------------------ layer sliders

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


def ema(values: list[float], weight: float) -> list[float]:
    """TensorBoard-style smoothing: an exponential moving average with bias correction.

    Args:
        values: the raw series (NaNs are carried over, not averaged).
        weight: 0 (no smoothing) … <1.

    Returns:
        A list as long as ``values``.
    """
    out, avg, n = [], 0.0, 0
    for v in values:
        if not math.isfinite(v):
            out.append(v)
            continue
        avg, n = weight * avg + (1 - weight) * v, n + 1
        out.append(avg / (1 - weight**n) if weight > 0 else v)
    return out
