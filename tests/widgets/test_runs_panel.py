"""The Runs tab: RunsController (no widgets) and RunsPanel over two real runs of the ledger."""

from __future__ import annotations

import pytest

from runlora_nb.ledger import recorded_tuner
from runlora_nb.train import FineTuneConfig
from runlora_nb.widgets.runs import RunsController
from runlora_nb.widgets.runs_view import RunsPanel

QUICK = {"model": "tiny-llama", "seq_len": 32, "batch_size": 4, "eval_batches": 1, "sample_tokens": 4}


@pytest.fixture(scope="module")
def ledger(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    ids = []
    for lr in (3e-3, 1e-3):
        cfg = FineTuneConfig(**QUICK, lr=lr, steps=4, eval_interval=2, runs_dir=str(root))
        tuner = recorded_tuner(cfg)
        tuner.run()
        ids.append(tuner.run_dir.name)
    return root, ids


def test_controller_lists_selects_compares_and_puts_samples_side_by_side(ledger):
    root, ids = ledger
    ctl = RunsController(root)
    seen = []
    ctl.subscribe(lambda kind, payload: seen.append(kind))
    runs = ctl.refresh()
    assert set(runs["id"]) == set(ids) and seen == ["runs"]
    assert ctl.comparison() is None
    ctl.select(ids)
    cmp = ctl.comparison()
    assert list(cmp.config_diff["field"]) == ["lr"]  # the only difference between the two runs
    assert set(cmp.curves["run"]) == set(ids) and set(cmp.curves["metric"]) == {"train_loss", "val_loss"}
    side = ctl.samples().table
    assert list(side.columns) == ["stage", "prompt", *ids] and len(side) > 0
    assert side[ids].notna().all().all()  # each run's text for the same prompt, in one row
    assert ctl.adapter_dir(ids[0]) is not None
    with pytest.raises(ValueError, match=r"no run 'nope'.*refresh"):
        ctl.select(["nope"])


def test_panel_overlays_curves_with_smoothing_and_log_scale(ledger):
    root, ids = ledger
    view = RunsPanel(RunsController(root))
    assert len(view.picker.options) == 2 and len(view.figure.data) == 0
    assert "pick some to compare" in view.status.value
    view.picker.value = tuple(ids)
    names = [t.name for t in view.figure.data]
    assert names == [f"{i} {m}" for i in ids for m in ("train", "val")]  # train solid + val dashed per run
    raw = list(view.figure.data[0].y)
    view.smoothing.value = 0.9
    smoothed = [t for t in view.figure.data if t.name == f"{ids[0]} train" and t.showlegend is not False]
    assert len(smoothed) == 1 and list(smoothed[0].y) != raw and smoothed[0].y[0] == pytest.approx(raw[0])
    view.log_y.value = True
    assert view.figure.layout.yaxis.type == "log"
    assert "lr" in view.diff_html.value and ids[1] in view.summary_html.value
    view.close()


def test_panel_error_is_shown_in_its_area(ledger, monkeypatch):
    root, ids = ledger
    view = RunsPanel(RunsController(root))
    monkeypatch.setattr(
        view.controller, "comparison", lambda: (_ for _ in ()).throw(RuntimeError("ledger broke"))
    )
    view.picker.value = (ids[0],)
    assert "ledger broke" in view.errors.text
    view.close()
