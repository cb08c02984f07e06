"""Model picker: the controller's state, counts and estimate; the view's widgets, buttons and errors."""

from __future__ import annotations

import copy

import pytest
from panel_helpers import all_widgets, wait_until

from runlora_nb.assets import zoo
from runlora_nb.integrations.inject import apply_runlora, trainable_parameters
from runlora_nb.widgets import ModelPicker, PickerController, default_model
from runlora_nb.widgets.picker import ALL_LINEAR


def test_the_default_model_is_the_embedded_one_that_answers_cached_or_not(monkeypatch):
    for cached in (True, False):  # not cached: the first load fetches it (with progress), never tiny-llama
        monkeypatch.setattr(zoo, "is_cached", lambda name, cached=cached: cached)
        assert default_model() == "smollm2-135m"
        assert PickerController().choice.model == "smollm2-135m"


def test_a_first_use_fetch_shows_a_progress_bar_then_hides_it(monkeypatch):
    real = zoo.load_model

    def fetching_load(name, progress=None, **kwargs):  # what zoo.load_model reports during a first fetch
        for stage, fraction in (("download", 0.0), ("download", 0.6), ("extract", 1.0), ("convert", 0.5)):
            progress(stage, fraction)
            seen.append((view.fetch_progress.layout.display, view.fetch_progress.description, fraction))
        return real("tiny-llama", **kwargs)

    seen: list = []
    monkeypatch.setattr(zoo, "load_model", fetching_load)
    view = ModelPicker(PickerController("smollm2-135m"))
    assert view.fetch_progress.layout.display == "none"
    view.load_button.click()
    assert view.task.join(60)
    assert [s[1] for s in seen] == ["download", "download", "extract", "convert"]
    assert all(s[0] != "none" for s in seen) and view.fetch_progress.layout.display == "none"
    assert view.errors.messages == []
    view.close()


def test_random_init_models_are_labelled_for_timing_only():
    assert zoo.is_random_init("tiny-llama") and not zoo.is_random_init("smollm2-135m")
    assert not zoo.is_random_init("/some/local/folder")
    view = ModelPicker(PickerController("tiny-llama"))
    view.load_button.click()
    assert view.task.join(60)
    assert zoo.RANDOM_WEIGHTS_LABEL in view.status.value
    view.close()


def test_set_validates_and_notifies_only_on_change():
    ctl = PickerController("tiny-llama")
    events = []
    ctl.subscribe(lambda kind, payload: events.append(kind))
    ctl.set(r=16, quantization="none", targets=["q_proj", "v_proj"])
    assert ctl.choice.r == 16 and ctl.choice.quantization is None
    assert ctl.choice.targets == ("q_proj", "v_proj")
    ctl.set(r=16)
    assert events == ["choice"]
    ctl.set(targets=["q_proj", ALL_LINEAR])
    assert ctl.choice.targets == ALL_LINEAR
    for bad in ({"r": 0}, {"dropout": 1.0}, {"dtype": "fp8"}, {"quantization": "q3"}, {"rank": 4}):
        with pytest.raises(ValueError):
            ctl.set(**bad)
    assert ctl.choice.r == 16


def test_unsupported_quantization_is_refused_with_the_reason(monkeypatch):
    monkeypatch.setattr(
        zoo, "quantization_support", lambda: {"nf4": "no GPU kernels", "fp4": None, "int8": None}
    )
    ctl = PickerController("tiny-llama")
    with pytest.raises(ValueError, match="no GPU kernels"):
        ctl.set(quantization="nf4")
    ctl.set(quantization="int8")


def test_load_fills_targets_and_counts_match_a_real_injection(picker_ctl):
    ctl = picker_ctl
    assert not ctl.stale
    loaded = ctl.loaded
    assert set(loaded.leaf_names) == {
        "q_proj",
        "k_proj",
        "v_proj",
        "o_proj",
        "gate_proj",
        "up_proj",
        "down_proj",
    }
    for targets in (ALL_LINEAR, ("q_proj", "v_proj")):
        ctl.set(targets=targets)
        counts = ctl.counts()
        real = apply_runlora(
            copy.deepcopy(loaded.model),
            r=ctl.choice.r,
            alpha=ctl.choice.alpha,
            target_modules=ctl.choice.target_modules,
        )
        params = trainable_parameters(real)
        assert counts["trainable"] == params.trainable
        assert counts["total"] == params.total
    assert counts["targets"] == 4  # q and v in two layers
    ctl.set(dtype="bf16")
    assert ctl.stale
    with pytest.raises(RuntimeError, match="load"):
        ctl.counts()


def test_estimate_and_config(picker_ctl):
    ctl = picker_ctl
    df = ctl.estimate()
    assert list(df["backend"]) == ["peft", "runlora"]
    peft, runlora = df.set_index("backend")["activation_bytes"]
    assert 0 < runlora < peft
    assert not ctl.estimate_stale
    ctl.set(batch_size=8)
    assert ctl.estimate_stale
    cfg = ctl.config(steps=3, lr=1e-3)
    assert (cfg.model, cfg.r, cfg.alpha, cfg.batch_size, cfg.seq_len, cfg.steps) == (
        "tiny-llama",
        4,
        8,
        8,
        32,
        3,
    )
    assert cfg.targets == ALL_LINEAR


def test_view_widgets_drive_the_controller(picker_ctl):
    view = ModelPicker(picker_ctl)
    view.r.value = 12
    view.dropout.value = 0.1
    view.batch_size.value = 2
    assert (
        picker_ctl.choice.r == 12 and picker_ctl.choice.dropout == 0.1 and picker_ctl.choice.batch_size == 2
    )
    assert set(view.targets.options) >= {ALL_LINEAR, "q_proj", "down_proj"}
    view.targets.value = ("q_proj", "v_proj")
    assert picker_ctl.choice.targets == ("q_proj", "v_proj")
    counts = picker_ctl.counts()
    assert f"{counts['trainable']:,d}" in view.counts_html.value
    picker_ctl.set(r=6)  # a change made elsewhere shows in the widgets
    assert view.r.value == 6
    assert wait_until(lambda: not view._quant_check.is_alive(), 30)
    view.quantization.value = "nf4"
    assert picker_ctl.choice.quantization == "nf4" and picker_ctl.stale
    assert "press Load" in view.status.value
    view.close()


def test_view_load_and_estimate_buttons_run_in_the_background():
    view = ModelPicker(PickerController("tiny-llama", batch_size=2, seq_len=16))
    assert view.targets.options == (ALL_LINEAR,)
    view.load_button.click()
    assert view.task.join(60)
    assert "loaded tiny-llama" in view.status.value
    assert "q_proj" in view.targets.options
    view.estimate_button.click()
    assert view.task.join(60)
    assert "runlora" in view.memory_html.value and "saved activations" in view.memory_html.value
    assert view.errors.messages == []
    view.close()


def test_autoload_does_not_block_and_loads():
    view = ModelPicker(PickerController("tiny-llama"), autoload=True)
    assert view.task.join(60)
    assert not view.controller.stale
    view.close()


def test_errors_land_in_the_panel_and_it_stays_usable(tmp_path):
    view = ModelPicker(PickerController("tiny-llama"))
    view.model.value = str(tmp_path / "no-such-model")
    view.load_button.click()
    view.task.join(60)
    assert "Unknown model" in view.errors.text or "config.json" in view.errors.text
    view.batch_size.value = 0  # below the slider's minimum: clamped, no error
    view.seq_len.value = 8
    view.model.value = "tiny-llama"
    view.load_button.click()
    assert view.task.join(60)
    assert "loaded tiny-llama" in view.status.value
    view.close()


def test_close_closes_every_widget(picker_ctl):
    view = ModelPicker(picker_ctl)
    tree = all_widgets(view)
    assert len(tree) > 15
    view.close()
    assert all(w.comm is None for w in tree)
    assert len(picker_ctl.listeners) == 0  # unsubscribed from the shared controller


def test_a_local_model_folder_loads(tmp_path):
    model, tokenizer = zoo.load_model("tiny-opt")
    folder = tmp_path / "my-model"
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    view = ModelPicker(PickerController("tiny-llama"))
    view.model.value = str(folder)
    view.load_button.click()
    assert view.task.join(60)
    assert view.errors.messages == []
    assert f"loaded {folder}" in view.status.value
    assert {"q_proj", "fc1", "fc2"} <= set(view.targets.options)
    assert view.controller.config().model == str(folder)
    view.close()


@pytest.mark.parametrize("bad", [2.5, True, "8"])
def test_rank_must_be_a_positive_int(bad):
    ctl = PickerController("tiny-llama")
    with pytest.raises(ValueError, match="positive int"):
        ctl.set(r=bad)
    assert ctl.choice.r == 8
