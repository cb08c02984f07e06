"""FrameSync: wait until the browser has painted what the kernel just sent (a tiny anywidget).

A chart update is a message to the front end; the browser parses it and redraws later, on the same cores
as the kernel. A race that starts its next timed round right after sending an update pays for that redraw
in whichever candidate runs first. :meth:`FrameSync.wait` sends a ping behind the update; the front end
answers after two animation frames (so after the paint), and the race goes on only then.

Without a front end (a test, a headless run, a closed notebook) nothing is waited for: no view ever
rendered, or the last ping went unanswered, means :meth:`wait` returns at once.
"""

from __future__ import annotations

import threading
from typing import Any

import anywidget
import traitlets

__all__ = ["FrameSync"]

_ESM = """
function render({ model, el }) {
  el.style.display = "none";
  model.set("views", (model.get("views") || 0) + 1);
  model.save_changes();
  model.on("msg:custom", (msg) => {
    if (msg && msg.ping !== undefined) {
      // two frames: the first runs before the paint of pending updates, the second after it
      requestAnimationFrame(() => requestAnimationFrame(() => model.send({ ack: msg.ping })));
    }
  });
}
export default { render };
"""


class FrameSync(anywidget.AnyWidget):
    """An invisible widget whose :meth:`wait` returns once the front end has painted.

    Attributes:
        views: how many front-end views rendered it (0: nobody is looking, so nothing is waited for).
        acks: pings answered so far.
        timeouts: pings that went unanswered within the timeout.
    """

    _esm = traitlets.Unicode(_ESM).tag(sync=True)
    views = traitlets.Int(0).tag(sync=True)

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.acks = 0
        self.timeouts = 0
        self._ping = 0
        self._answered = threading.Event()
        self._responsive = True
        self._lock = threading.Lock()
        self.on_msg(self._on_msg)
        self.observe(self._on_views, names="views")

    def _on_views(self, _change: Any) -> None:
        self._responsive = True  # a new view: try waiting for it again

    def _on_msg(self, _widget: Any, content: Any, _buffers: Any) -> None:
        if isinstance(content, dict) and content.get("ack") == self._ping:
            self.acks += 1
            self._responsive = True
            self._answered.set()

    @property
    def watched(self) -> bool:
        """A front end rendered this widget and answered its last ping."""
        return self.views > 0 and self._responsive

    def wait(self, timeout: float = 2.0) -> bool:
        """Block until the front end painted everything sent before this call.

        Args:
            timeout: seconds to wait at most; an unanswered ping stops later waits until a front end answers
                again (a closed tab costs one timeout, not one per round).

        Returns:
            True when the front end answered, False when there was nothing to wait for or it timed out.
        """
        if not self.watched:
            return False
        with self._lock:
            self._ping += 1
            self._answered.clear()
            self.send({"ping": self._ping})
            answered = self._answered.wait(timeout)
        if not answered:
            self.timeouts += 1
            self._responsive = False
        return answered
