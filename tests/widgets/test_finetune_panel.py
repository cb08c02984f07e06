"""Fine-tune: the controller records runs, stops within a step, saves, overlays PEFT; the view follows it."""

from __future__ import annotations

import threading

import pytest
from panel_helpers import all_widgets, wait_until

from runlora_nb.train import FineTuneConfig
from runlora_nb.widgets import FineTuneController, FineTunePanel

FAST = {"lr": 3e-3, "eval_interval": 3, "overrides": (("sample_tokens", 4),)}


def _adapter_files(path) -> set[str]:
    return {p.name for p in path.iterdir()} if path.is_dir() else set()


def test_run_records_steps_evals_samples_and_plans(picker_ctl, run_dir):
    ctl = FineTuneController(picker_ctl, steps=6, output_dir=str(run_dir / "a"), **FAST)
    cfg = ctl.config()
    assert (cfg.model, cfg.r, cfg.batch_size, cfg.seq_len, cfg.steps, cfg.lr) == (
        "tiny-llama",
        4,
        4,
        32,
        6,
        3e-3,
    )
    kinds = []
    ctl.subscribe(lambda kind, payload: kinds.append(kind))
    (run,) = ctl.run()
    assert run.backend == "runlora" and run.steps == [1, 2, 3, 4, 5, 6]
    assert len(run.losses) == len(run.tokens_per_s) == 6 and all(t > 0 for t in run.tokens_per_s)
    assert run.val_steps == [0, 3, 6]
    assert set(run.samples) == {"before", "after"}
    assert run.plans is not None and len(run.plans) == 14 and set(run.plans["fwd"]) <= {"fwd1", "fwd2"}
    assert run.end is not None and not run.end.stopped and run.end.step == 6
    assert "adapter_config.json" in _adapter_files(run_dir / "a")
    assert kinds[0] == "run" and kinds[-1] == "finished" and kinds.count("step") == 6 and "plans" in kinds
    p = ctl.progress()
    assert p["done"] == p["total"] == 6 and p["eta_s"] == 0.0 and p["loss"] == run.losses[-1]
    saved = ctl.save_adapter(run_dir / "copy")
    assert "adapter_model.safetensors" in _adapter_files(saved)
    assert set(ctl.losses()["backend"]) == {"runlora"}


def test_start_then_stop_ends_within_two_steps_and_saves(picker_ctl, run_dir):
    ctl = FineTuneController(picker_ctl, steps=500, output_dir=str(run_dir / "stop"), **FAST)
    stop_at = {}

    def stop_on_step_2(kind, payload):
        if kind == "step" and payload.step == 2 and not stop_at:
            stop_at["step"] = payload.step
            stop_at["progress"] = ctl.progress()
            threading.Thread(target=ctl.stop).start()  # from another thread, like a button click

    ctl.subscribe(stop_on_step_2)
    ctl.start()
    assert ctl.join(120)
    (run,) = ctl.runs
    assert run.end.stopped and run.end.error is None
    assert run.end.step - stop_at["step"] <= 2
    assert run.stop_requested_at is not None and run.end.step - run.stop_requested_at <= 2
    p = stop_at["progress"]  # while training: steps done, ETA and throughput
    assert p["done"] == 2 and p["total"] == 500 and p["eta_s"] > 0 and p["tokens_per_s"] > 0
    assert p["backend"] == "runlora" and p["loss"] > 0
    assert run.end.adapter_dir == str(run_dir / "stop")
    assert "adapter_model.safetensors" in _adapter_files(run_dir / "stop")
    assert not ctl.running


def test_stop_before_the_model_is_ready_still_stops(picker_ctl, run_dir):
    ctl = FineTuneController(picker_ctl, steps=500, output_dir=str(run_dir / "early"), **FAST)
    ctl.subscribe(lambda kind, payload: ctl.stop() if kind == "run" else None)
    ctl.start()
    assert ctl.join(120)
    assert ctl.runs[0].end.stopped and ctl.runs[0].end.step <= 1


def test_peft_overlay_runs_second_in_the_same_thread(picker_ctl, run_dir):
    ctl = FineTuneController(picker_ctl, steps=3, compare_peft=True, output_dir=str(run_dir / "cmp"), **FAST)
    threads = set()
    ctl.subscribe(
        lambda kind, payload: threads.add(threading.current_thread().name) if kind == "step" else None
    )
    ctl.start()
    assert ctl.join(120)
    assert [r.backend for r in ctl.runs] == ["runlora", "peft"]
    assert all(r.steps == [1, 2, 3] for r in ctl.runs)
    assert ctl.runs[1].plans is None  # PEFT has no chain plans
    assert threads == {"runlora-finetune"}
    assert "adapter_config.json" in _adapter_files(run_dir / "cmp-peft")
    # same seed and data: the first losses agree closely between the two backends
    assert abs(ctl.runs[0].losses[0] - ctl.runs[1].losses[0]) < 1e-3
    assert ctl.progress()["total"] == 6


def test_without_a_picker_and_validation():
    ctl = FineTuneController(base_config=FineTuneConfig(model="tiny-llama", seq_len=32), steps=2)
    assert ctl.config().model == "tiny-llama" and ctl.config().steps == 2
    with pytest.raises(ValueError):
        ctl.set(steps=0)
    assert ctl.settings.steps == 2
    with pytest.raises(RuntimeError, match="Start"):
        ctl.save_adapter("/tmp/nowhere")


def test_view_start_stop_curves_and_save(picker_ctl, run_dir):
    view = FineTunePanel(FineTuneController(picker_ctl, output_dir=str(run_dir / "view"), **FAST))
    view.steps.value = 500
    view.lr.value = 1e-3
    assert view.controller.settings.steps == 500 and view.controller.settings.lr == pytest.approx(1e-3)
    assert "tiny-llama" in view.choice_html.value
    view.start_button.click()
    assert view.start_button.disabled and not view.stop_button.disabled
    assert view.controller.wait(lambda c: c.runs and c.runs[0].step >= 2, 120)
    view.stop_button.click()  # the click handler runs while the training thread goes on
    assert view.controller.join(120)
    run = view.controller.runs[0]
    assert run.end.stopped and run.end.step - run.stop_requested_at <= 2
    view._redraw.flush()
    train = next(t for t in view.figure.data if t.name == "runlora train")
    assert list(train.x) == run.steps and list(train.y) == run.losses
    val = next(t for t in view.figure.data if t.name == "runlora validation")
    assert list(val.x) == run.val_steps
    assert "stopped at step" in view.status.value and "Stop pressed after step" in view.status.value
    assert "chain plan in use" in view.plans_html.value and "fwd" in view.plans_html.value
    assert "before" in view.samples_html.value and "after" in view.samples_html.value
    assert view.progress.value == run.step and not view.start_button.disabled and view.stop_button.disabled
    view.save_path.value = str(run_dir / "saved")
    view.save_button.click()
    assert "saved the adapter" in view.save_status.value
    assert "adapter_model.safetensors" in _adapter_files(run_dir / "saved")
    assert view.errors.messages == []
    view.close()


def test_view_peft_overlay_adds_a_second_curve(picker_ctl, run_dir):
    view = FineTunePanel(FineTuneController(picker_ctl, steps=3, output_dir=str(run_dir / "o"), **FAST))
    view.compare_peft.value = True
    view.start_button.click()
    assert view.controller.join(120)
    view._redraw.flush()
    names = [t.name for t in view.figure.data]
    assert names == ["runlora train", "runlora validation", "peft train", "peft validation"]
    peft_train = view.figure.data[2]
    assert list(peft_train.x) == [1, 2, 3] and len(peft_train.y) == 3
    assert "<b>peft</b> on cpu: done" in view.status.value  # where each run trains is shown
    # eval loss sits next to train loss; the train curves can be smoothed and the axis made logarithmic
    raw = list(view.controller.runs[0].losses)
    assert list(view.figure.data[0].y) == raw
    view.smoothing.value = 0.9
    smoothed = list(view.figure.data[0].y)
    assert smoothed[0] == pytest.approx(raw[0], rel=1e-12) and smoothed != raw  # bias-corrected EMA
    assert list(view.figure.data[1].y) == list(
        view.controller.runs[0].val_losses
    )  # validation: never smoothed
    view.log_y.value = True
    assert view.figure.layout.yaxis.type == "log"
    view.close()


def test_view_errors_land_in_the_panel_and_it_stays_usable(picker_ctl, run_dir):
    view = FineTunePanel(FineTuneController(picker_ctl, steps=2, output_dir=str(run_dir / "e"), **FAST))
    view.dataset.value = "no-such-dataset"
    view.start_button.click()
    assert view.controller.join(60)
    assert wait_until(lambda: "no-such-dataset" in view.errors.text, 5)
    assert "failed" in view.status.value and not view.start_button.disabled
    view.save_button.click()  # nothing trained: the error is shown, nothing raised
    assert "no trained runlora_nb model" in view.errors.text
    view.dataset.value = "sonnets"
    view.start_button.click()
    assert view.controller.join(120)
    assert view.controller.runs[0].end.step == 2
    view.close()


def test_view_close_stops_training_and_closes_widgets(picker_ctl, run_dir):
    view = FineTunePanel(FineTuneController(picker_ctl, steps=500, output_dir=str(run_dir / "c"), **FAST))
    view.start_button.click()
    assert view.controller.wait(lambda c: c.runs and c.runs[0].step >= 1, 120)
    tree = all_widgets(view)
    view.close()
    assert view.controller.join(120)
    assert view.controller.runs[0].end.stopped
    assert all(w.comm is None for w in tree)
    assert len(picker_ctl.listeners) == 0


def test_the_memory_chart_draws_measured_memory_against_the_ledgers_prediction(picker_ctl, run_dir):
    view = FineTunePanel(FineTuneController(picker_ctl, steps=3, output_dir=str(run_dir / "m"), **FAST))
    view.start_button.click()
    assert view.controller.join(120)
    view._redraw.flush()
    (run,) = view.controller.runs
    assert run.memory is not None and run.memory_error is None
    lines = {t.name: t for t in view.memory_figure.data}
    assert set(lines) == {"runlora saved tensors", "runlora peak", "runlora predicted saved",
                          "runlora predicted total (lower bound)"}  # fmt: skip
    saved, predicted = lines["runlora saved tensors"], lines["runlora predicted saved"]
    assert list(saved.x) == [1, 2, 3] and all(v is not None and v > 0 for v in saved.y)
    mib = 2.0**20
    assert saved.y[0] == pytest.approx(run.history.steps[0].saved_bytes / mib)
    # the ledger's fit of the saved bytes is exact for a transformer's shapes: measured and predicted agree
    assert saved.y[0] == pytest.approx(predicted.y[0], rel=0.05)
    assert all(v > 0 for v in lines["runlora peak"].y)
    assert lines["runlora predicted total (lower bound)"].y[0] > predicted.y[0]
    view.close()
