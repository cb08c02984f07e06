"""The panels' plumbing: throttled redraws, error capture, background jobs, option buttons, closing."""

from __future__ import annotations

import threading
import time

import ipywidgets as widgets
import pytest
import traitlets
from panel_helpers import all_widgets, wait_until

from runlora_nb.assets import zoo
from runlora_nb.widgets.chrome import ChoiceButtons, ErrorArea, Panel
from runlora_nb.widgets.formatting import df_html, fmt_bytes, fmt_count, fmt_seconds
from runlora_nb.widgets.tasks import BackgroundTask, Listeners, Throttle


def test_throttle_runs_at_most_once_per_interval_and_draws_the_last_state():
    seen = []
    state = {"value": 0}
    throttle = Throttle(lambda: seen.append(state["value"]), interval=0.1)
    start = time.monotonic()
    for k in range(1, 201):  # 200 calls in ~0.4 s
        state["value"] = k
        throttle()
        time.sleep(0.002)
    elapsed = time.monotonic() - start
    assert wait_until(lambda: not throttle.pending, 1.0)
    assert seen[0] == 1  # the first call runs at once
    assert seen[-1] == 200  # the trailing run sees the final state
    assert len(seen) <= elapsed / 0.1 + 2
    assert len(seen) >= 2


def test_throttle_is_pending_until_the_trailing_run_has_finished():
    started, release, done = threading.Event(), threading.Event(), []

    def slow_draw():
        if done:  # the trailing run: slow, like a chart redraw on a loaded machine
            started.set()
            release.wait(10)
        done.append(1)

    throttle = Throttle(slow_draw, interval=0.05)
    throttle()  # runs at once
    throttle()  # trailing, after the window
    assert started.wait(10)
    assert throttle.pending  # the trailing run is still drawing: its result is not there yet
    release.set()
    assert wait_until(lambda: not throttle.pending, 10)
    assert len(done) == 2


def test_throttle_flush_runs_now_and_close_cancels():
    calls = []
    throttle = Throttle(lambda: calls.append(time.monotonic()), interval=10.0)
    throttle()
    throttle()  # inside the window: scheduled for later
    assert len(calls) == 1 and throttle.pending
    throttle.flush()
    assert len(calls) == 2 and not throttle.pending
    throttle()
    assert throttle.pending
    throttle.close()
    assert not throttle.pending
    throttle()
    throttle.flush()
    assert len(calls) == 2


def test_throttle_never_runs_fn_concurrently():
    active, overlaps = [0], [0]
    lock = threading.Lock()

    def slow():
        with lock:
            active[0] += 1
            overlaps[0] = max(overlaps[0], active[0])
        time.sleep(0.02)
        with lock:
            active[0] -= 1

    throttle = Throttle(slow, interval=0.0)
    threads = [threading.Thread(target=throttle) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert overlaps[0] == 1


def test_error_area_shows_tracebacks_and_clears():
    area = ErrorArea(keep=2)
    assert area.widget.layout.display == "none"
    try:
        raise ZeroDivisionError("boom <tag>")
    except ZeroDivisionError:
        text = area.report("my callback")
    assert text.startswith("my callback: Traceback")
    assert "ZeroDivisionError: boom &lt;tag&gt;" in area.html.value
    assert area.widget.layout.display == "flex"
    area.clear_button.click()
    assert area.messages == [] and area.html.value == "" and area.widget.layout.display == "none"


def test_panel_guard_catches_and_keeps_working():
    panel = Panel()
    button = widgets.Button(description="Go")
    panel.children = [button, panel.errors.widget]
    calls = []

    def action():
        calls.append(1)
        if len(calls) == 1:
            raise ValueError("first click fails")

    panel.on_click(button, action)
    button.click()  # raises inside: caught
    assert "ValueError: first click fails" in panel.errors.text
    assert "Go click" in panel.errors.text
    button.click()  # the panel still works
    assert calls == [1, 1]
    slider = widgets.IntSlider()
    panel.on_change(slider, lambda v: 1 / (v - 3))
    slider.value = 3
    assert "ZeroDivisionError" in panel.errors.text


def test_panel_close_closes_every_widget_and_stops_timers():
    panel = Panel()
    inner = widgets.VBox([widgets.Button(), widgets.HBox([widgets.IntSlider()])])
    panel.children = [inner, panel.errors.widget]
    ran = []
    throttle = panel.throttled(lambda: ran.append(1), interval=10.0)
    throttle()
    throttle()
    cleaned = []
    panel.add_cleanup(lambda: cleaned.append(True))
    tree = all_widgets(panel)
    panel.close()
    assert all(w.comm is None for w in tree)
    assert cleaned == [True]
    assert not throttle.pending and ran == [1]
    panel.close()  # idempotent


def test_listeners_call_everyone_then_raise_the_first_error():
    seen = []
    listeners = Listeners()
    listeners.subscribe(lambda kind, p: (_ for _ in ()).throw(RuntimeError("bad listener")))
    unsubscribe = listeners.subscribe(lambda kind, p: seen.append((kind, p)))
    with pytest.raises(RuntimeError, match="bad listener"):
        listeners.notify("x", 1)
    assert seen == [("x", 1)]
    unsubscribe()
    assert len(listeners) == 1


def test_background_task_reports_errors_and_refuses_overlap():
    errors = []
    task = BackgroundTask("t", on_error=errors.append)
    gate = threading.Event()
    task.start(gate.wait)
    with pytest.raises(RuntimeError, match="already running"):
        task.start(lambda: None)
    gate.set()
    assert task.join(5)
    task.start(lambda: 1 / 0)
    assert task.join(5)
    assert "ZeroDivisionError" in errors[0] and task.error == errors[0]


def test_choice_buttons_disable_options_with_reasons():
    choice = ChoiceButtons(["none", "nf4", "int8"], "none", {"nf4": None, "int8": "no bitsandbytes"})
    assert choice.buttons["int8"].disabled and not choice.buttons["nf4"].disabled
    assert "no bitsandbytes" in choice.note.value and "int8" in choice.buttons["int8"].tooltip
    changes = []
    choice.observe(lambda c: changes.append(c["new"]), names="value")
    choice.buttons["nf4"].value = True  # a click on nf4
    assert choice.value == "nf4" and not choice.buttons["none"].value
    with pytest.raises(traitlets.TraitError, match="no bitsandbytes"):
        choice.value = "int8"
    choice.buttons["nf4"].value = False  # clicking the selected one keeps it selected
    assert choice.value == "nf4" and choice.buttons["nf4"].value
    choice.set_reasons({"int8": None, "nf4": None})
    choice.value = "int8"
    assert changes == ["nf4", "int8"] and choice.note.value == ""


def test_quantization_support_reports_reasons(monkeypatch):
    def fake(q):
        if q == "int8":
            raise RuntimeError("bitsandbytes failed to import here")

    from runlora_nb.assets import loading

    monkeypatch.setattr(loading, "require_quantization", fake)
    assert zoo.quantization_support() == {
        "nf4": None,
        "fp4": None,
        "int8": "bitsandbytes failed to import here",
    }


def test_formatting_helpers():
    assert fmt_bytes(512) == "512 B" and fmt_bytes(1536) == "1.5 KiB" and fmt_bytes(None) == "–"
    assert fmt_bytes(3 * 2**30) == "3.0 GiB"
    assert (
        fmt_seconds(2e-4) == "200 µs"
        and fmt_seconds(0.0123) == "12.3 ms"
        and fmt_seconds(200) == "3 min 20 s"
    )
    assert fmt_count(134_515_008) == "134.5 M" and fmt_count(12) == "12"
    import pandas as pd

    assert "nothing yet" in df_html(pd.DataFrame())
    assert "more rows" in df_html(pd.DataFrame({"a": range(5)}), max_rows=2)
