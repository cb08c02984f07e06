"""Chain race: the controller fills results through callbacks and cancels; the view draws bars, tables, CSV."""

from __future__ import annotations

import threading

import pandas as pd
import pytest
from panel_helpers import SMALL_LAYER, all_widgets, wait_until

from runlora_nb.core.chains import valid_pairs
from runlora_nb.measure import LAYER_COLUMNS, Measurement
from runlora_nb.widgets import ChainRace, RaceController
from runlora_nb.widgets import race as race_module
from runlora_nb.widgets.race_view import DIAGONAL, PEAK, SAVED, SCATTER, TIME


def test_layer_race_fills_results_through_callbacks():
    ctl = RaceController(**SMALL_LAYER)
    events = []
    ctl.subscribe(lambda kind, payload: events.append(kind))
    expected = ["frozen", "peft", "runlora", "twin", *("+".join(p) for p in valid_pairs(0.0))]
    assert ctl.expected_candidates() == expected and ctl.total == len(expected) * 2
    df = ctl.run()
    assert events[0] == "started" and events[-1] == "done"
    assert events.count("round") == 2  # one per round, after that round's measurements
    first_round = events.index("round")
    assert events[1:first_round] == ["measurement"] * len(expected)
    assert events.count("measurement") == ctl.received == ctl.total
    assert set(ctl.measurements) == set(expected) == set(df["candidate"])
    assert list(df.columns) == LAYER_COLUMNS and not ctl.cancelled and not ctl.running
    assert all(len(m.samples) == 2 and m.final for m in ctl.snapshot())
    pv = ctl.predicted_vs_measured()
    assert set(pv["candidate"]) == set(expected) - {"frozen", "peft"}
    assert (pv["predicted_s"] > 0).all() and (pv["median_s"] > 0).all()


def test_dropout_rules_out_the_merged_pairs():
    ctl = RaceController(**{**SMALL_LAYER, "dropout": 0.1})
    df = ctl.run()
    assert not any("fwd2" in c or "bwd4" in c or "bwd5" in c for c in df["candidate"])
    assert len(df) == 4 + len(list(valid_pairs(0.1)))


def test_cancel_stops_early_with_partial_results():
    ctl = RaceController(**{**SMALL_LAYER, "reps": 500})

    def cancel_after_first_round(kind, payload):
        if kind == "measurement" and ctl.received >= len(ctl.candidates):
            ctl.cancel()

    ctl.subscribe(cancel_after_first_round)
    ctl.start()
    assert ctl.join(60)
    assert ctl.cancelled and not ctl.running
    assert ctl.result is not None and ctl.result.attrs["cancelled"]
    assert ctl.received < ctl.total
    assert (ctl.result["reps"] < 500).all()


def test_model_race_uses_the_picker(picker_ctl):
    ctl = RaceController(picker_ctl, source="model", reps=2, warmup=0)
    assert ctl.expected_candidates() == ["no adapters", "peft", "runlora"]
    df = ctl.run()
    assert list(df["candidate"]) == ["no adapters", "peft", "runlora"]
    assert (df["model"] == "tiny-llama").all() and (df["batch"] == 4).all()
    assert ctl.plans is not None and len(ctl.plans) == 14
    assert ctl.received == 6


def test_settings_are_validated():
    ctl = RaceController()
    bad_settings = (
        {"source": "gpu"},
        {"reps": 0},
        {"tokens": 0},
        {"dtype": "fp8"},
        {"device": "tpu"},
        {"source": "model", "noise_check": True},
    )
    for bad in bad_settings:
        with pytest.raises(ValueError):
            ctl.set(**bad)
    with pytest.raises(RuntimeError, match="picker"):
        RaceController(source="model").run()


def test_export_csv(tmp_path):
    ctl = RaceController(**SMALL_LAYER)
    with pytest.raises(RuntimeError, match="nothing to export"):
        ctl.export_csv(tmp_path / "x.csv")
    ctl.run()
    path = ctl.export_csv(tmp_path / "sub" / "race.csv")
    back = pd.read_csv(path)
    assert list(back.columns) == LAYER_COLUMNS and len(back) == len(ctl.result)


def test_view_race_draws_every_candidate(tmp_path):
    view = ChainRace(RaceController(**SMALL_LAYER))
    view.rank.value = 8
    view.reps.value = 2
    assert view.controller.settings.rank == 8
    view.race_button.click()
    assert view.controller.join(60)
    view._redraw.flush()
    ctl = view.controller
    n = len(ctl.expected_candidates())
    bars = view.figure.data[TIME]
    assert len(bars.y) == len(bars.x) == len(bars.error_x.array) == n
    assert set(bars.y) == set(ctl.result["candidate"])
    med = ctl.result.set_index("candidate")["median_s"]
    assert [round(x, 9) for x in bars.x] == [round(med[c] * 1e3, 9) for c in bars.y]
    iqr = ctl.result.set_index("candidate")["iqr_s"]
    for c, plus, minus in zip(bars.y, bars.error_x.array, bars.error_x.arrayminus):  # Q1 … Q3
        assert plus >= 0 and minus >= 0 and plus + minus == pytest.approx(iqr[c] * 1e3)
    saved = view.figure.data[SAVED]
    assert len(saved.x) == n and max(saved.x) > 0
    assert len(view.figure.data[SCATTER].x) == n - 2  # pairs, plan and twin have predictions
    assert len(view.figure.data[DIAGONAL].x) == 2
    assert view.progress.value == view.progress.max == n * 2
    assert "done" in view.status.value
    assert not view.race_button.disabled and view.cancel_button.disabled
    html = view.table.outputs[0]["data"]["text/html"]
    assert "fwd1+bwd1" in html and "ratio_frozen" in html
    view.csv_path.value = str(tmp_path / "race.csv")
    view.export_button.click()
    assert (tmp_path / "race.csv").is_file()
    assert "race.csv" in view.export_out.outputs[0]["data"]["text/plain"]
    assert view.errors.messages == []
    view.close()


def test_view_cancel_button_and_redraw_rate():
    view = ChainRace(RaceController(**{**SMALL_LAYER, "reps": 400}))
    draws = []
    original = view._redraw.fn
    view._redraw.fn = lambda: (draws.append(1), original())
    seen = threading.Event()
    view.controller.subscribe(lambda kind, payload: seen.set() if kind == "measurement" else None)
    view.race_button.click()
    assert view.race_button.disabled and not view.cancel_button.disabled
    assert seen.wait(60)
    assert wait_until(lambda: view.controller.received > 100, 60)
    view.cancel_button.click()
    assert view.controller.join(60)
    assert view.controller.cancelled
    assert wait_until(lambda: "cancelled" in view.status.value, 5)
    assert len(draws) < view.controller.received / 5  # throttled: far fewer draws than measurements
    view.close()


def test_view_error_lands_in_the_error_area(monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("engine exploded")

    monkeypatch.setattr(race_module, "race_layer", broken)
    view = ChainRace(RaceController(**SMALL_LAYER))
    view.race_button.click()
    assert view.controller.join(30)
    assert wait_until(lambda: "engine exploded" in view.errors.text, 5)
    assert "failed" in view.status.value and not view.race_button.disabled
    monkeypatch.undo()
    view.race_button.click()  # the panel stays usable
    assert view.controller.join(60)
    assert view.controller.result is not None
    view.close()


def test_view_draws_the_allocator_peak_when_there_is_one():
    view = ChainRace(RaceController(**SMALL_LAYER))
    ctl = view.controller
    ctl.candidates = ["frozen", "fwd1+bwd1"]
    for name, kind, peak in (("frozen", "floor", 3 * 2**20), ("fwd1+bwd1", "pair", 5 * 2**20)):
        ctl._measured(Measurement(name, kind, "", "", (1e-3, 2e-3, 4e-3), 2**20, peak, 10, 1e-3, False))
    view._redraw.flush()
    peak = view.figure.data[PEAK]
    assert list(peak.y) == ["frozen", "fwd1+bwd1"] and list(peak.x) == [3.0, 5.0]
    bars = view.figure.data[TIME]
    assert list(bars.error_x.arrayminus) == [pytest.approx(0.5)] * 2  # Q1 = 1.5 ms, 0.5 below the median
    assert list(bars.error_x.array) == [pytest.approx(1.0)] * 2  # Q3 = 3 ms
    view.close()


def test_view_source_toggle_and_close(picker_ctl):
    view = ChainRace(RaceController(picker_ctl, **SMALL_LAYER))
    view.source.value = "model"
    assert view.controller.settings.source == "model"
    assert view.shape_box.layout.display == "none"
    tree = all_widgets(view)
    view.close()
    assert all(w.comm is None for w in tree) and view.figure.comm is None


def test_noise_check_races_copies_of_one_layer():
    ctl = RaceController(**SMALL_LAYER, noise_check=True)
    assert ctl.expected_candidates() == ["runlora", "twin", "twin 2", "twin 3"]
    df = ctl.run()
    assert sorted(df["candidate"]) == sorted(ctl.expected_candidates())
    assert set(df["kind"]) == {"plan", "twin"}
    assert df[["fwd", "bwd"]].drop_duplicates().shape[0] == 1  # all the very same layer


def test_view_never_draws_while_a_candidate_is_timed(monkeypatch):
    """Honest race: the chart is drawn between rounds only, never during a timed call."""
    from runlora_nb.measure import layer_race

    timing = threading.Event()
    real = layer_race.interleaved

    def flagged(candidates, **kw):
        def wrap(fn):
            def timed():
                timing.set()
                try:
                    fn()
                finally:
                    timing.clear()

            return timed

        return real({name: wrap(fn) for name, fn in candidates.items()}, **kw)

    monkeypatch.setattr(layer_race, "interleaved", flagged)
    view = ChainRace(RaceController(**{**SMALL_LAYER, "reps": 6}))
    during = []
    original = view._redraw.fn
    view._redraw.fn = lambda: (during.append(timing.is_set()), original())
    view.race_button.click()
    assert view.controller.join(60)
    assert view.errors.messages == []
    assert len(during) >= 6 and not any(during)  # a draw per round, none inside a timed call
    assert not view.frame_sync.watched  # no browser here: the rounds did not wait for one
    view.close()


def test_set_rejects_a_dtype_a_race_cannot_run_in():
    """A bad choice (dtype="int8") must fail in set(), not later when the race runs."""
    ctl = RaceController(**SMALL_LAYER)
    for bad in ("int8", "float64", "uint8"):
        with pytest.raises(ValueError, match=r"dtype must be one of .*fp32.*bf16.*fp16"):
            ctl.set(dtype=bad)
    assert ctl.settings.dtype == SMALL_LAYER.get("dtype", "fp32")
    assert ctl.set(dtype="bfloat16").dtype == "bfloat16"


def test_closed_view_refuses_to_start_a_race():
    """After close() the Race button's start() must not launch a race nobody can see."""
    ctl = RaceController(**SMALL_LAYER)
    view = ChainRace(ctl)
    view.close()
    with pytest.raises(RuntimeError, match="closed"):
        view.start()
    assert not ctl.running and ctl.ran is None


def test_status_shows_the_race_timing_notes():
    """A race whose timings are off the cost model says so in the panel's status."""
    ctl = RaceController(**SMALL_LAYER)
    view = ChainRace(ctl)
    df = pd.DataFrame({"candidate": ["runlora"], "kind": ["plan"], "median_s": [1.0]})
    df.attrs["notes"] = [
        "measured times are 89× the cost model's prediction; set OMP_NUM_THREADS=2 and rerun"
    ]
    ctl.ran, ctl.result = ctl.settings, df
    view._draw()
    assert "89× the cost model" in view.status.value and "OMP_NUM_THREADS=2" in view.status.value
    view.close()
