"""FrameSync: a race round waits for the browser's paint when one is watching, and never otherwise."""

from __future__ import annotations

import threading
import time

from runlora_nb.widgets._frame_sync import FrameSync


def _answering(sync: FrameSync, delay: float = 0.05) -> list[dict]:
    """Make ``sync.send`` answer like the front end would (after ``delay`` seconds, from another thread)."""
    sent: list[dict] = []

    def send(content, buffers=None):
        sent.append(content)
        threading.Timer(delay, sync._on_msg, args=(sync, {"ack": content["ping"]}, [])).start()

    sync.send = send
    return sent


def test_no_front_end_means_no_wait():
    sync = FrameSync()
    t0 = time.monotonic()
    assert sync.wait(5.0) is False
    assert time.monotonic() - t0 < 0.5 and sync.timeouts == 0


def test_waits_for_the_answer_of_a_rendered_view():
    sync = FrameSync()
    sync.views = 1  # what the front end's render() does
    sent = _answering(sync, delay=0.2)
    t0 = time.monotonic()
    assert sync.wait(5.0) is True
    assert 0.15 <= time.monotonic() - t0 < 4.0
    assert sync.acks == 1 and sent == [{"ping": 1}]
    assert sync.wait(5.0) is True and sent[-1] == {"ping": 2}


def test_an_unanswered_ping_costs_one_timeout_until_a_view_answers_again():
    sync = FrameSync()
    sync.views = 1
    sync.send = lambda content, buffers=None: None  # a closed tab: nobody answers
    assert sync.wait(0.3) is False and sync.timeouts == 1
    t0 = time.monotonic()
    assert sync.wait(5.0) is False  # not watched any more: no second timeout
    assert time.monotonic() - t0 < 0.5 and sync.timeouts == 1
    sync.views = 2  # the notebook is opened again
    _answering(sync)
    assert sync.wait(5.0) is True


def test_a_stale_answer_does_not_release_a_later_wait():
    sync = FrameSync()
    sync.views = 1
    sync.send = lambda content, buffers=None: None
    sync._ping = 7
    sync._on_msg(sync, {"ack": 3}, [])  # an answer to an old ping
    assert sync.acks == 0
