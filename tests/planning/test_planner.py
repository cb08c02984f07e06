"""Planner: valid pairs only, modes, in-memory and JSON caches (round trip, corrupt file), cost model."""

from __future__ import annotations

import itertools
import json
import time
from pathlib import Path

import pytest
import torch

from runlora_nb.common.paths import cache_dir
from runlora_nb.core.chains import BACKWARD, FORWARD, Needs, pair_flops, valid_pairs
from runlora_nb.planning import costmodel, planner
from runlora_nb.planning.costmodel import SKINNY_CLASSES, get_model, recalibrate, skinny_class

SHAPES = [(2048, 1024, 1024, 16), (4096, 768, 768, 8), (512, 4096, 4096, 8), (7, 5, 3, 2), (1, 64, 64, 64)]


@pytest.fixture
def fresh_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("RUNLORA_NB_CACHE", str(tmp_path))
    planner.clear_cache()
    monkeypatch.setattr(planner, "_disk", None)
    monkeypatch.setattr(costmodel, "_models", {})
    yield tmp_path
    planner.clear_cache()
    monkeypatch.setattr(planner, "_disk", None)


@pytest.mark.parametrize("mode", ["flops", "auto"])
@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_plans_are_valid_pairs_and_never_merged_with_dropout(mode, dropout):
    for shape, bits in itertools.product(SHAPES, itertools.product([False, True], repeat=3)):
        plan = planner.plan_chains(*shape, needs=Needs(*bits), dropout=dropout, mode=mode)
        assert plan.pair in set(valid_pairs(dropout))
        if dropout:
            assert not FORWARD[plan.fwd].merged and not BACKWARD[plan.bwd].merged
        assert plan.flops == pair_flops(*plan.pair, *shape, Needs(*bits))
        assert plan.reason


def test_flops_mode_picks_the_fewest_flops():
    for shape in SHAPES:
        plan = planner.plan_chains(*shape, mode="flops")
        best = min(pair_flops(*p, *shape) for p in valid_pairs(0.0))
        assert plan.flops == best


def test_fp32_adapters_on_bf16_base_exclude_merged_chains():
    plan = planner.plan_chains(
        4096, 1024, 1024, 16, dtype=torch.bfloat16, adapter_dtype=torch.float32, mode="flops"
    )
    assert plan.pair in set(valid_pairs(0.0, allow_merged=False, mixed=True))
    assert not (FORWARD[plan.fwd].merged or BACKWARD[plan.bwd].merged)


def test_cost_model_prices_the_base_dtype_rank_r_path_only_when_adapters_are_wider():
    from runlora_nb.planning.costmodel import CostModel

    rates = dict(base_flops=4e11, adapter_flops=2e11, skinny_bw={"n": 1e10, "m": 1e10, "k": 5e9})
    rates.update(elementwise_bw=3e10, overhead=1e-5, call_overhead=1e-4, mask_per_element=1e-9)
    shape = (4096, 768, 768, 8, Needs())
    mixed = CostModel("cpu", "bfloat16", "float32", **rates)
    # no cast of X in forward, and half the bytes through its skinny products
    assert mixed.pair_seconds("fwd3", "bwd1", *shape, False, "") < mixed.pair_seconds(
        "fwd1", "bwd1", *shape, False, ""
    )
    same = CostModel("cpu", "bfloat16", "bfloat16", **rates)
    assert same.pair_seconds("fwd3", "bwd1", *shape, False, "") == same.pair_seconds(
        "fwd1", "bwd1", *shape, False, ""
    )


def test_timed_mode_measures_within_about_a_second(fresh_cache):
    t0 = time.perf_counter()
    plan = planner.plan_chains(512, 256, 256, 8, mode="timed")
    assert (
        time.perf_counter() - t0 < 10
    )  # budget 1 s of timed rounds, plus set-up; generous for a busy CI box
    assert plan.mode == "timed" and plan.predicted_s > 0 and plan.pair in set(valid_pairs(0.0))


def test_memory_cache_returns_the_same_object_fast(fresh_cache):
    a = planner.plan_chains(1024, 512, 512, 8, mode="auto")
    t0 = time.perf_counter()
    for _ in range(1000):
        b = planner.plan_chains(1024, 512, 512, 8, mode="auto")
    per_call = (time.perf_counter() - t0) / 1000
    assert b is a
    assert per_call < 1e-3  # microseconds in practice; a millisecond would mean re-planning


def test_json_cache_round_trip_across_processes(fresh_cache):
    plan = planner.plan_chains(1024, 512, 512, 8, mode="auto")
    planner.flush()  # what the timer thread (or interpreter exit) does
    data = json.loads((cache_dir() / "plans.json").read_text())
    assert any(v["fwd"] == plan.fwd and v["bwd"] == plan.bwd for v in data.values())
    planner.clear_cache()
    planner._disk = None  # a new process: nothing in memory
    again = planner.plan_chains(1024, 512, 512, 8, mode="auto")
    assert again == plan


def test_a_cache_miss_writes_no_file_in_the_call_and_the_timer_writes_it(fresh_cache, monkeypatch):
    monkeypatch.setattr(planner, "FLUSH_DELAY_S", 0.2)
    path = cache_dir() / "plans.json"
    path.unlink(missing_ok=True)
    planner.clear_cache()
    planner._disk = None
    writes = []
    monkeypatch.setattr(
        planner, "atomic_write_text", lambda p, text: (writes.append(p), Path(p).write_text(text))
    )
    plans = [planner.plan_chains(256 + 64 * k, 128, 128, 4, mode="auto") for k in range(5)]
    assert writes == [] and not path.exists()  # nothing written on the layer's call path
    deadline = time.monotonic() + 60
    while not path.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert len(writes) == 1, "five new plans are written in one batch"
    stored = json.loads(path.read_text())
    assert len(stored) == 5 and {v["fwd"] for v in stored.values()} <= {p.fwd for p in plans}


def test_the_in_memory_plan_cache_is_bounded(fresh_cache, monkeypatch):
    monkeypatch.setattr(planner, "MEMORY_PLANS", 8)
    planner.clear_cache()
    for n in range(1, 40):
        planner.plan_chains(16 * n, 64, 64, 4, mode="flops")
    assert len(planner._memory) == 8
    assert planner.PlanKey(
        16 * 39, 64, 64, 4, planner.Needs(), "float32", "float32", "cpu", False, "", "flops"
    ) in (planner._memory)  # the most recent ones are kept


def test_corrupt_cache_is_ignored_and_rewritten(fresh_cache):
    (cache_dir() / "plans.json").write_text("{not json")
    plan = planner.plan_chains(256, 128, 128, 4, mode="auto")
    assert plan.pair in set(valid_pairs(0.0))
    planner.flush()
    assert json.loads((cache_dir() / "plans.json").read_text())  # valid JSON again
    # a well-formed file with a bogus entry is ignored too
    key = next(iter(json.loads((cache_dir() / "plans.json").read_text())))
    (cache_dir() / "plans.json").write_text(json.dumps({key: {"fwd": "fwd9", "bwd": "bwd1"}}))
    planner.clear_cache()
    planner._disk = None
    with pytest.warns(UserWarning, match="ignoring the entry"):
        assert planner.plan_chains(256, 128, 128, 4, mode="auto").fwd in FORWARD


def test_cost_model_is_calibrated_and_cached(fresh_cache):
    model = get_model("cpu", "float32", "float32")
    assert model.base_flops > 1e9 and model.overhead > 0 and model.call_overhead > model.overhead
    assert set(model.skinny_bw) == set(SKINNY_CLASSES) and min(model.skinny_bw.values()) > 1e8
    assert "calibration.json" in {p.name for p in cache_dir().iterdir()}
    # predictions grow with the work
    small = model.pair_seconds("fwd1", "bwd1", 256, 256, 256, 8, Needs(), False, "")
    big = model.pair_seconds("fwd1", "bwd1", 2048, 1024, 1024, 8, Needs(), False, "")
    assert big > 10 * small


def test_recalibrate_forgets_calibrations(fresh_cache):
    get_model("cpu", "float32", "float32")
    recalibrate()
    assert not (cache_dir() / "calibration.json").exists()
    assert get_model("cpu", "float32", "float32").base_flops > 0


def test_skinny_classes_follow_the_gemm_shapes():
    from runlora_nb.core.chains import Gemm

    assert skinny_class(Gemm(4096, 1024, 16), 16) == "n"
    assert skinny_class(Gemm(16, 4096, 1024, trans_a=True), 16) == "m"
    assert skinny_class(Gemm(4096, 16, 1024, accumulate=True), 16) == "k"
    assert skinny_class(Gemm(4096, 1024, 1024), 16) is None


def test_bad_arguments():
    with pytest.raises(ValueError, match="mode must be one of"):
        planner.plan_chains(8, 8, 8, 2, mode="fastest")
    with pytest.raises(ValueError, match="sizes must be positive"):
        planner.plan_chains(8, 0, 8, 2)


def test_plan_text_explains_itself():
    plan = planner.plan_chains(4096, 1024, 1024, 16, mode="flops")
    text = str(plan)
    assert plan.fwd in text and "GFLOP" in text and plan.reason in text


def test_calibration_ignores_the_callers_autograd_state(fresh_cache):
    """First plan in a process may calibrate: under no_grad (a generation) or inside a saved-tensor
    recorder it must neither fail nor leave its own tensors in the caller's record."""
    from runlora_nb.core.memory import SavedTensorRecorder

    with torch.no_grad(), SavedTensorRecorder() as rec:
        plan = planner.plan_chains(64, 32, 32, 4, mode="auto")
    assert plan.predicted_s > 0
    assert rec.records == []
