"""Concurrency for the panels: rate-limited redraws, listeners, one background job at a time, and the one-time
import of transformers that background jobs must share.

No widget import: the controllers (which hold a panel's state and run its jobs) use these, and they must import
without ipywidgets.
"""

from __future__ import annotations

import math
import threading
import time
import traceback
from collections.abc import Callable
from typing import Any

__all__ = ["REDRAW_INTERVAL_S", "BackgroundTask", "Listeners", "Throttle", "quiet_imports"]

REDRAW_INTERVAL_S = 0.2  # charts redraw at most five times a second


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
