"""The Sweep tab: SweepController (no widgets) and SweepPanel on a 4-trial rank × lr grid on tiny-llama."""

from __future__ import annotations

import pytest
from panel_helpers import wait_until

from runlora_nb.widgets.sweep import SweepController
from runlora_nb.widgets.sweep_view import SweepPanel


def _settings(tmp_path, **kw):
    return {
        "r": "2,4",
        "lr": "1e-3,3e-3",
        "steps": 4,
        "trials": 4,
        "seq_len": 32,
        "eval_interval": 2,
        "storage": str(tmp_path / "sweeps.db"),
        "runs_dir": str(tmp_path / "runs"),
        "pruner": None,  # every trial runs to the end (the pruner is run_sweep's, tested there)
        **kw,
    }


def test_panel_runs_a_grid_draws_four_curves_a_leaderboard_and_optunas_views(tmp_path):
    view = SweepPanel(**_settings(tmp_path))
    view.start_button.click()
    assert view.controller.join(300), "the sweep did not finish within 300 s"
    assert view.controller.error is None, view.controller.error
    assert wait_until(lambda: not view._redraw.pending, 30)
    board = view.controller.board
    assert len(board) == 4 and set(board.status) == {"complete"}
    assert sorted(zip(board.r, board.lr)) == [(2, 1e-3), (2, 3e-3), (4, 1e-3), (4, 3e-3)]
    assert len(view.figure.data) == 4 and all(len(t.y) >= 2 for t in view.figure.data)
    assert view.board_html.value.count("<tr") == 5  # header + four trials
    assert "<b>done</b>: 4 trials" in view.status.value
    assert len(view.views.outputs) >= 1  # optuna's parallel coordinates (and importances)
    again = SweepController(**_settings(tmp_path))  # the same study resumes: nothing left to run
    assert len(again.run()) == 4 and again.snapshot() == []
    view.close()


def test_stop_then_start_resumes_to_the_budget(tmp_path):
    ctl = SweepController(**_settings(tmp_path, steps=30, eval_interval=5))
    ctl.start()
    assert wait_until(lambda: len(ctl.snapshot()) >= 1 and len(ctl.snapshot()[0].steps) >= 1, 300)
    ctl.stop()
    assert ctl.join(300)
    first = ctl.board
    assert (first.status == "complete").sum() < 4
    ctl.start()
    assert ctl.join(600)
    assert (ctl.board.status == "complete").sum() == 4


def test_bad_settings_are_refused_and_shown(tmp_path):
    with pytest.raises(ValueError, match="not a valid int"):
        SweepController(r="four")
    ctl = SweepController(**_settings(tmp_path))
    with pytest.raises(ValueError, match="steps must be a positive int"):
        ctl.set(steps=0)
    view = SweepPanel(ctl)
    view.lr.value = "3e-3:1e-3"  # an inverted range: the panel shows it, the kernel survives
    assert "lr" in view.errors.text and ctl.settings.lr == "1e-3,3e-3"
    view.close()
