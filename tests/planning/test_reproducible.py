"""Reproducible plans: chain="flops" ignores the machine, plans serialise, and a recorded plan can be pinned."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from torch import nn

from runlora_nb import ChainPlan, apply_runlora, pin_plans, record_plans, runlora_layers, valid_pairs
from runlora_nb.common.paths import cache_dir
from runlora_nb.nn import layer as layer_mod
from runlora_nb.planning import costmodel, planner

# fewest-FLOP pairs, worked out from the GEMM lists (pair_flops); the same on every machine by construction
GOLDEN_FLOPS = {
    ((2048, 1024, 1024, 16), 0.0): ("fwd2", "bwd5"),
    ((2048, 1024, 1024, 16), 0.1): ("fwd1", "bwd1"),
    ((7, 5, 3, 2), 0.0): ("fwd2", "bwd4"),
    ((7, 5, 3, 2), 0.1): ("fwd1", "bwd3"),
    ((512, 4096, 4096, 8), 0.0): ("fwd1", "bwd1"),
}


@pytest.fixture
def fresh_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("RUNLORA_NB_CACHE", str(tmp_path))
    planner.clear_cache()
    monkeypatch.setattr(planner, "_disk", None)
    monkeypatch.setattr(costmodel, "_models", {})
    yield tmp_path
    planner.clear_cache()
    monkeypatch.setattr(planner, "_disk", None)


def _no_machine(*args, **kwargs):
    raise AssertionError("flops mode must not consult the cost model, the timer or the plan cache")


def test_flops_mode_is_the_same_on_every_machine(fresh_cache, monkeypatch):
    # a machine with a poisoned plan cache and a calibration that favours other pairs
    poisoned = {planner.PlanKey(*s, planner.Needs(), "float32", "float32", "cpu", d > 0, "", "flops").as_str():
                ChainPlan("fwd1", "bwd2", "flops", 0, None, 0, "poisoned").to_dict() for s, d in GOLDEN_FLOPS}  # fmt: skip
    (cache_dir() / "plans.json").write_text(json.dumps(poisoned))
    monkeypatch.setattr(costmodel, "get_model", _no_machine)
    monkeypatch.setattr(planner, "time_pairs", _no_machine)
    monkeypatch.setattr(planner, "_load_disk", _no_machine)
    for threads in (1, 2):
        monkeypatch.setattr(torch, "get_num_threads", lambda t=threads: t)
        planner.clear_cache()
        for (shape, dropout), pair in GOLDEN_FLOPS.items():
            plan = planner.plan_chains(*shape, dropout=dropout, mode="flops")
            assert plan.pair == pair and plan.mode == "flops" and plan.predicted_s is None


def test_chain_plan_round_trips_through_json():
    plan = planner.plan_chains(64, 32, 48, 4, mode="flops")
    back = ChainPlan.from_dict(json.loads(json.dumps(plan.to_dict())))
    assert back == plan
    assert ChainPlan.from_dict({"fwd": "fwd1", "bwd": "bwd3"}).pair == ("fwd1", "bwd3")
    with pytest.raises(ValueError, match="unknown chain pair"):
        ChainPlan.from_dict({**plan.to_dict(), "fwd": "fwd9"})
    with pytest.raises(ValueError, match="unknown fields"):
        ChainPlan.from_dict({**plan.to_dict(), "speed": 1})
    with pytest.raises(TypeError, match="flops"):
        ChainPlan.from_dict({**plan.to_dict(), "flops": "many"})
    with pytest.raises(TypeError, match="dict"):
        ChainPlan.from_dict(["fwd1", "bwd1"])


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(32, 48), nn.ReLU(), nn.Linear(48, 40), nn.ReLU(), nn.Linear(40, 24))


def _step(model, x):
    model.zero_grad(set_to_none=True)
    x = x.clone().requires_grad_()
    y = model(x)
    y.backward(torch.ones_like(y))
    return y.detach(), x.grad, [layer.lora_A.weight.grad.clone() for _, layer in runlora_layers(model)]


def test_pinned_plans_give_bit_identical_outputs(fresh_cache, monkeypatch):
    x = torch.randn(6, 32, generator=torch.Generator().manual_seed(1))
    recorded_model = apply_runlora(
        _model(), r=4, alpha=8, target_modules="all-linear", init_lora_weights=False
    )
    rerun = copy.deepcopy(recorded_model)
    reference = _step(recorded_model, x)
    plans = json.loads(json.dumps(record_plans(recorded_model)))  # what a run's config stores
    assert set(plans) == {"0", "2", "4"}
    # another machine, another pair: not bit-identical (so the check below can fail)
    for name, layer in runlora_layers(rerun):
        other = next(p for p in valid_pairs(0.0) if p != tuple(ChainPlan.from_dict(plans[name]).pair))
        layer.set_chain(other)
    y_other = _step(rerun, x)[0]
    assert not torch.equal(y_other, reference[0])
    # pinned: the planner is never asked again, and every number matches bit for bit
    pin_plans(rerun, plans)
    monkeypatch.setattr(layer_mod, "plan_chains", _no_machine)
    got = _step(rerun, x)
    assert torch.equal(got[0], reference[0]) and torch.equal(got[1], reference[1])
    assert all(torch.equal(a, b) for a, b in zip(got[2], reference[2]))
    assert {n: layer.last_plan.pair for n, layer in runlora_layers(rerun)} == {
        n: (p["fwd"], p["bwd"]) for n, p in plans.items()
    }


def test_apply_runlora_accepts_a_recorded_plan_and_pin_plans_checks_first():
    plan = ChainPlan("fwd2", "bwd4", "auto", 1, 1e-3, 0, "recorded").to_dict()
    model = apply_runlora(_model(), r=4, target_modules="all-linear", chain=plan)
    assert all(layer.chain == ("fwd2", "bwd4") for _, layer in runlora_layers(model))
    assert model.runlora_config.chain == ("fwd2", "bwd4")
    with pytest.raises(ValueError, match="merges the adapter"):
        apply_runlora(_model(), r=4, target_modules="all-linear", dropout=0.1, chain=plan)
    dropout_model = apply_runlora(_model(), r=4, target_modules="all-linear", dropout=0.1)
    good = {"0": {"fwd": "fwd1", "bwd": "bwd1"}}
    with pytest.raises(ValueError, match="name no RunLoRA layer"):
        pin_plans(dropout_model, {**good, "9": good["0"]})
    with pytest.raises(ValueError, match="merges the adapter"):
        pin_plans(dropout_model, {**good, "2": plan})
    assert all(layer.chain == "auto" for _, layer in runlora_layers(dropout_model))  # nothing half-pinned


# ------------------------------------------------------------- a plan read back from plans.json is checked first


def _auto_key(dropout: bool) -> planner.PlanKey:
    return planner.PlanKey(64, 32, 48, 4, planner.Needs(), "float32", "float32", "cpu", dropout, "", "auto")


def test_an_edited_plan_cache_cannot_give_a_dropout_layer_a_merged_pair(fresh_cache):
    key = _auto_key(True)
    merged = ChainPlan("fwd2", "bwd4", "auto", 1, 1e-6, 0, "hand-edited").to_dict()
    (cache_dir() / "plans.json").write_text(json.dumps({key.as_str(): merged}))
    with pytest.warns(UserWarning, match="ignoring the entry.*not valid"):
        plan = planner.plan_chains(64, 32, 48, 4, dropout=0.1, mode="auto")
    assert plan.pair in set(valid_pairs(0.1)) and plan.reason != "hand-edited"
    # the entry is replaced by a valid plan, so the next process does not warn again
    planner.flush()
    assert json.loads((cache_dir() / "plans.json").read_text())[key.as_str()]["fwd"] == plan.fwd


@pytest.mark.parametrize(
    "edit",
    [{"mode": "timed"}, {"flops": 12345}, {"fwd": "fwd9"}, {"flops": "x"}],
    ids=["wrong-mode", "wrong-flops", "unknown-chain", "bad-type"],
)
def test_plan_cache_entries_must_match_their_key(fresh_cache, edit):
    key = _auto_key(False)
    good = planner.plan_chains(64, 32, 48, 4, mode="flops")  # a real plan for this shape
    entry = {**good.to_dict(), "mode": "auto", "reason": "hand-edited", **edit}
    (cache_dir() / "plans.json").write_text(json.dumps({key.as_str(): entry}))
    planner.clear_cache()
    with pytest.warns(UserWarning, match="ignoring the entry"):
        plan = planner.plan_chains(64, 32, 48, 4, mode="auto")
    assert plan.reason != "hand-edited"


def test_plans_from_another_runlora_version_are_not_reused(fresh_cache):
    import runlora_nb

    key = _auto_key(False)
    assert key.runlora_version == runlora_nb.__version__ and runlora_nb.__version__ in key.as_str()
    old = planner.PlanKey(**{**key.__dict__, "runlora_version": "0.0.1"})
    stale = {**planner.plan_chains(64, 32, 48, 4, mode="flops").to_dict(), "mode": "auto", "reason": "stale"}
    (cache_dir() / "plans.json").write_text(json.dumps({old.as_str(): stale}))
    planner.clear_cache()
    assert planner.plan_chains(64, 32, 48, 4, mode="auto").reason != "stale"
    planner.flush()  # the new plan's pending write lands now, not over the file edited below
    # while the same entry under this version's key is reused
    (cache_dir() / "plans.json").write_text(json.dumps({key.as_str(): stale}))
    planner.clear_cache()
    planner._disk = None
    assert planner.plan_chains(64, 32, 48, 4, mode="auto").reason == "stale"
