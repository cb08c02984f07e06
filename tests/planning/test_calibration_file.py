"""Bad values in calibration.json must not crash a forward: the planner falls back and hints to recalibrate."""

from __future__ import annotations

import json
from dataclasses import asdict

import pytest
import torch
from torch import nn

from runlora_nb import RunLoRALinear
from runlora_nb.common.paths import cache_dir
from runlora_nb.planning import costmodel, planner


@pytest.fixture
def fresh_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("RUNLORA_NB_CACHE", str(tmp_path))
    planner.clear_cache()
    monkeypatch.setattr(planner, "_disk", None)
    monkeypatch.setattr(costmodel, "_models", {})
    yield tmp_path
    planner.clear_cache()
    monkeypatch.setattr(planner, "_disk", None)


def _good_fields() -> dict:
    return asdict(costmodel.default_model("cpu", "float32", "float32"))


@pytest.mark.parametrize(
    "edit",
    [
        {"base_flops": 0},
        {"base_flops": None},
        {"skinny_bw": {}},
        {"skinny_bw": {"n": 1e10, "m": 0, "k": 1e10}},
        {"elementwise_bw": -1.0},
        {"overhead": float("nan")},
        {"call_overhead": "fast"},
    ],
    ids=["zero", "null", "empty-skinny", "zero-skinny", "negative", "nan", "string"],
)
def test_bad_calibration_values_fall_back_with_a_recalibrate_hint(fresh_cache, edit, monkeypatch):
    key = costmodel._cache_key("cpu", "float32", "float32")
    (cache_dir() / "calibration.json").write_text(json.dumps({key: {**_good_fields(), **edit}}))
    monkeypatch.setattr(
        costmodel, "_calibrate_isolated", lambda *a: pytest.fail("must not measure mid-forward")
    )
    layer = RunLoRALinear(nn.Linear(32, 24), r=4, chain="auto", init_lora_weights=False)
    x = torch.randn(10, 32, requires_grad=True)
    with pytest.warns(UserWarning, match=r"unusable.*runlora-nb plan --recalibrate"):
        y = layer(x)
    y.sum().backward()
    assert torch.isfinite(y).all() and x.grad is not None
    assert layer.last_plan.mode == "auto" and layer.last_plan.predicted_s > 0


def test_a_list_or_a_wrong_device_entry_is_rejected_too():
    assert "dict" in costmodel.check_fields([1, 2], "cpu", "float32", "float32")
    assert "another device" in costmodel.check_fields(_good_fields(), "cuda", "float32", "float32")
    assert "missing or unknown" in costmodel.check_fields({"device": "cpu"}, "cpu", "float32", "float32")
    assert costmodel.check_fields(_good_fields(), "cpu", "float32", "float32") is None


def test_a_good_calibration_is_used_as_stored(fresh_cache):
    key = costmodel._cache_key("cpu", "float32", "float32")
    fields = {**_good_fields(), "base_flops": 1.25e11}
    (cache_dir() / "calibration.json").write_text(json.dumps({key: fields}))
    assert costmodel.get_model("cpu", "float32", "float32").base_flops == 1.25e11
