"""The LoRA X-ray in the panels: a history per run from the controller, and a finished run's saved adapter."""

from __future__ import annotations

import pytest

from runlora_nb.integrations.adapter_files import AdapterError
from runlora_nb.widgets import FineTuneController
from runlora_nb.widgets.adapter_xray import finished_run_xray, last_xray, xray_summary

FAST = {"lr": 3e-3, "eval_interval": 3, "overrides": (("sample_tokens", 4),)}


def test_controller_keeps_an_xray_per_evaluation_and_the_saved_adapter_agrees(picker_ctl, run_dir):
    ctl = FineTuneController(picker_ctl, steps=6, output_dir=str(run_dir / "a"), **FAST)
    events = []
    ctl.subscribe(lambda kind, payload: events.append(payload) if kind == "xray" else None)
    (run,) = ctl.run()
    snaps = run.xray.snapshots
    assert [s.step for s in snaps] == run.val_steps == [0, 3, 6] and len(events) == 3
    assert run.xray.error is None
    first, last = snaps[0].table, snaps[-1].table
    assert len(first) == 14 and (first["norm"] == 0).all() and (first["effective_rank"] == 0).all()
    assert (last["norm"] > 0).all() and (last["effective_rank"] > 0).all()
    assert last["chain"].str.fullmatch(r"fwd\d\+bwd\d").all(), last["chain"].tolist()
    history = run.xray.frame()
    assert len(history) == 3 * 14 and list(history["step"].unique()) == [0, 3, 6]
    assert last_xray(ctl.runs) is snaps[-1]

    saved = finished_run_xray(run_dir / "a").set_index("module")
    live = last.set_index("module")
    assert sorted(saved.index) == sorted(live.index)
    diff = (saved["norm"] - live.loc[saved.index, "norm"]).abs().max()
    assert diff <= 1e-6 * live["norm"].max()  # the same fp32 weights, read back from the file
    assert saved["grad_A"].isna().all() and (saved["chain"] == "saved").all()
    by_run = finished_run_xray(ctl.trainers[0].run_dir).set_index("module")  # the ledger's run folder
    assert (by_run["chain"] == live.loc[by_run.index, "chain"]).all()  # from the run's recorded plans
    table = xray_summary(saved.reset_index())
    assert list(table.columns)[:4] == ["module", "r", "s", "‖sBA‖"]


def test_finished_run_xray_of_a_folder_without_an_adapter_is_a_clear_error(tmp_path):
    with pytest.raises(AdapterError, match="is missing"):
        finished_run_xray(tmp_path)


def test_a_failing_xray_is_recorded_not_raised():
    from runlora_nb.widgets.adapter_xray import XrayHistory

    class Broken:
        def named_modules(self):
            raise RuntimeError("boom")

    h = XrayHistory()
    assert h.record(3, Broken()) is None and "boom" in h.error and h.latest() is None


def test_lab_tab_draws_the_xray_live_and_from_a_folder_and_reports_bad_folders(picker_ctl, run_dir):
    from runlora_nb.widgets import LoRALab
    from runlora_nb.widgets.adapter_xray_view import ERANK, NORM

    ctl = FineTuneController(picker_ctl, steps=3, output_dir=str(run_dir / "b"), **FAST)
    lab = LoRALab(xray_runs=lambda: ctl.runs)
    lab.xray.refresh_button.click()  # nothing trained yet: a note, not an error
    assert "no fine-tune X-ray yet" in lab.xray.caption.value and not lab.errors.messages
    ctl.subscribe(lab.guard(lab.xray.follow, where="X-ray"))
    (run,) = ctl.run()
    lab.xray._redraw.flush()
    bars = lab.xray.figure.data
    assert len(bars[NORM].x) == 14 and all(v > 0 for v in bars[NORM].y)  # live, after the last evaluation
    assert list(bars[ERANK].y) == list(run.xray.latest().table["effective_rank"])
    assert "after step 3" in lab.xray.caption.value and "q_proj" in lab.xray.table.value

    lab.xray.folder.value = str(run_dir / "b")
    lab.xray.open_button.click()
    assert "saved adapter" in lab.xray.caption.value and not lab.errors.messages
    lab.xray.folder.value = str(run_dir / "nowhere")
    lab.xray.open_button.click()
    assert "is missing" in lab.errors.text  # the panel's own error area
    lab.close()
