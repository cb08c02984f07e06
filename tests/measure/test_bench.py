"""Measurement engine: documented columns, live callbacks, cancel, memory counts, model race, X-ray.

No timing thresholds here: performance is measured by `runlora-nb bench`, not asserted in tests.
"""

from __future__ import annotations

import io
import math

import pandas as pd
import pytest
import torch

from runlora_nb.core.chains import valid_pairs
from runlora_nb.measure import (
    LAYER_COLUMNS,
    MODEL_COLUMNS,
    LayerSpec,
    Measurement,
    check_targets,
    compare_saved_tensors,
    estimate_memory,
    grid_specs,
    layer_saved_tensors,
    race_grid,
    race_layer,
    race_model,
)

SMALL = LayerSpec(128, 96, 64, 8)


def test_race_layer_returns_every_candidate_with_documented_columns():
    df = race_layer(SMALL, reps=2)
    assert list(df.columns) == LAYER_COLUMNS
    names = set(df.candidate)
    assert {"frozen", "peft", "runlora"} <= names
    assert {"+".join(p) for p in valid_pairs(0.0)} <= names
    assert (df.reps == 2).all() and (df.median_s > 0).all()
    frozen = df[df.candidate == "frozen"].iloc[0]
    assert frozen.ratio_frozen == pytest.approx(1.0)
    assert df[df.candidate == "peft"].iloc[0].ratio_peft == pytest.approx(1.0)
    plan = df[df.kind == "plan"].iloc[0]
    assert (plan.fwd, plan.bwd) in set(valid_pairs(0.0)) and plan.predicted_s > 0
    x_bytes = 128 * 96 * 4
    # exact memory: runlora keeps X only; PEFT keeps X and XA; the frozen layer keeps nothing of size N
    assert (df[df.kind.isin(["pair", "plan"])].saved_bytes == x_bytes).all()
    assert df[df.candidate == "peft"].iloc[0].saved_bytes == x_bytes + 128 * 8 * 4
    assert frozen.saved_bytes == 0
    assert df.attrs["cancelled"] is False


def test_dropout_race_has_only_valid_pairs_and_peft_keeps_more():
    df = race_layer(LayerSpec(128, 96, 64, 8, dropout=0.1), reps=1)
    pairs = set(df[df.kind == "pair"].candidate)
    assert pairs == {"+".join(p) for p in valid_pairs(0.1)}
    peft = df[df.candidate == "peft"].iloc[0]
    assert peft.saved_over_x >= 1.9
    assert (df[df.kind == "plan"].saved_over_x <= 1.07).all()


def test_callback_fires_per_candidate_per_round_and_final_last():
    seen: list[Measurement] = []
    race_layer(SMALL, reps=3, include_pairs=False, on_measurement=seen.append)
    assert len(seen) == 4 * 3  # frozen, peft, runlora, its twin × 3 rounds
    assert [m.final for m in seen[-4:]] == [True] * 4 and not any(m.final for m in seen[:-4])
    assert len(seen[-1].samples) == 3 and seen[0].median > 0 and seen[-1].iqr >= 0


def test_cancel_returns_partial_results():
    calls = {"n": 0}

    def cancel():
        calls["n"] += 1
        return calls["n"] > 8  # warm-up is 4 calls, one timed round is 4 more, then stop in the second

    df = race_layer(SMALL, reps=50, include_pairs=False, cancel=cancel)
    assert df.attrs["cancelled"] is True
    assert 1 <= df.reps.max() < 50


def test_grid_and_target_check():
    specs = grid_specs(dtypes=("float32",), dropouts=(0.0, 0.1), shapes=((64, 32, 32, 4),))
    df = race_grid(specs, reps=1)
    summary = check_targets(df)
    assert len(summary) == 2
    assert {
        "plan_over_frozen",
        "plan_over_peft",
        "pair_over_best",
        "twin_spread",
        "ok_frozen",
        "ok_saved",
    } <= set(summary.columns)
    assert summary.ok_saved.all() and (summary.pair_over_best >= 1.0).all()
    buf = io.StringIO()
    # a grid saved with --csv and read back (quant "" becomes NaN) checks the same
    df.to_csv(buf, index=False)
    buf.seek(0)
    assert len(check_targets(pd.read_csv(buf))) == 2


def test_quantized_layer_race():
    pytest.importorskip("bitsandbytes")
    df = race_layer(LayerSpec(64, 64, 32, 4, quant="nf4"), reps=1, include_pairs=False)
    assert set(df.candidate) == {"frozen", "peft", "runlora", "twin"}
    assert df[df.candidate == "runlora"].iloc[0].saved_over_x == pytest.approx(1.0)


def test_bad_spec_is_explained():
    with pytest.raises(ValueError, match="quant must be"):
        LayerSpec(quant="int4")
    with pytest.raises(ValueError, match="unknown dtype"):
        LayerSpec(dtype="float8")


def test_race_model_times_three_candidates_and_plans_every_module():
    res = race_model("tiny-llama", batch=2, seq=32, r=4, reps=2)
    assert list(res.times.columns) == MODEL_COLUMNS
    assert list(res.times.candidate) == ["no adapters", "peft", "runlora"]
    rl = res.times.set_index("candidate")
    assert rl.loc["runlora", "saved_bytes"] < rl.loc["peft", "saved_bytes"]
    assert rl.loc["peft", "ratio_peft"] == pytest.approx(1.0)
    assert len(res.plans) == 2 * 7  # 2 layers × (q, k, v, o, gate, up, down)
    assert (res.plans.fwd != "").all() and res.plans.tokens.eq(64).all()


def test_xray_of_a_layer_names_what_each_side_keeps():
    df = layer_saved_tensors(64, 32, 16, 4, dropout=0.1)
    peft = df[(df.backend == "peft") & (df.kind != "parameter")]
    ours = df[(df.backend == "runlora") & (df.kind != "parameter")]
    assert set(ours.tensor) == {"X"}
    assert set(peft.tensor) == {
        "dropout mask",
        "dropped copy D(X)",
        "XA = X·A",
    }  # PEFT's CPU mask is a float tensor
    assert ours.bytes.sum() < peft.bytes.sum()


def test_xray_and_memory_estimate_of_a_model():
    df = compare_saved_tensors("tiny-llama", batch=1, seq=16, r=4, dropout=0.1)
    per = df[df.kind != "parameter"].groupby("backend").bytes.sum()
    assert per["runlora"] < per["peft"]
    assert (df.module != "").any()
    from runlora_nb.assets.zoo import load_model

    model, _ = load_model("tiny-llama")
    flags = [p.requires_grad for p in model.parameters()]
    est = estimate_memory(model, batch=1, seq=16, r=4, dropout=0.1)
    assert list(est.backend) == ["peft", "runlora"]
    est = est.set_index("backend")
    assert est.loc["runlora", "activation_bytes"] < est.loc["peft", "activation_bytes"]
    weights = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
    assert est.loc["runlora", "weights_bytes"] == weights
    assert [p.requires_grad for p in model.parameters()] == flags  # the caller's model is untouched
    assert isinstance(est, pd.DataFrame) and not math.isnan(est.total_bytes.sum())


def test_race_model_refuses_cuda_without_a_device():
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: tests/cuda covers the GPU path")
    with pytest.raises(ValueError, match=r"sees no CUDA device.*device='cpu'"):
        race_model("tiny-llama", batch=1, seq=8, r=2, reps=1, device="cuda")


def _fake_timings(monkeypatch, seconds_of):
    """Replace the timing loop: every candidate gets ``seconds_of(name)`` in each round (no real timing)."""
    from runlora_nb.measure import layer_race

    def fake(steps, *, reps, on_round, **_kw):
        samples = {name: [] for name in steps}
        for k in range(reps):
            for name in steps:
                samples[name].append(seconds_of(name))
            on_round(k, samples)
        return samples

    monkeypatch.setattr(layer_race, "interleaved", fake)


NOTE_SPEC = LayerSpec(64, 32, 48, 4)


def test_race_notes_measurements_far_off_the_cost_model(monkeypatch):
    """Timings far off the cost model (56 ms measured, 0.63 ms predicted) must be flagged, not pass silently."""
    from runlora_nb.app.tables import format_layer_table

    _fake_timings(monkeypatch, lambda name: 5.0)  # seconds: far above any prediction for this shape
    df = race_layer(NOTE_SPEC, reps=3, warmup=0, include_peft=False)
    notes = df.attrs["notes"]
    assert len(notes) == 1 and "cost model's prediction" in notes[0]
    assert "OMP_NUM_THREADS=" in notes[0] and "rerun" in notes[0]
    assert "NOTE: measured times are" in format_layer_table(df)


def test_race_notes_a_wide_twin_spread(monkeypatch):
    from runlora_nb.measure import layer_race

    monkeypatch.setattr(
        layer_race, "_predict", lambda model, pair, spec: 1e-3
    )  # the model agrees on the rest
    _fake_timings(monkeypatch, lambda name: 1.6e-3 if name == "twin" else 1e-3)
    df = race_layer(NOTE_SPEC, reps=3, warmup=0, include_peft=False)
    notes = df.attrs["notes"]
    assert len(notes) == 1 and notes[0].startswith("twin spread 60%") and "OMP_NUM_THREADS" in notes[0]


def test_race_with_sound_timings_has_no_notes(monkeypatch):
    from runlora_nb.measure.layer_race import timing_notes

    df = pd.DataFrame(
        {
            "kind": ["plan", "twin", "pair"],
            "median_s": [1e-3, 1.1e-3, 2e-3],
            "predicted_s": [8e-4, 8e-4, 1e-3],
        }
    )
    assert timing_notes(df) == []
    df.loc[1, "median_s"] = 2e-3
    assert len(timing_notes(df)) == 1


def test_grid_collects_each_specs_timing_notes(monkeypatch):
    _fake_timings(monkeypatch, lambda name: 5.0)
    specs = [NOTE_SPEC, LayerSpec(64, 48, 32, 4)]
    df = race_grid(specs, reps=2, warmup=0)
    notes = df.attrs["notes"]
    assert len(notes) == 2 and notes[0].startswith(NOTE_SPEC.label()) and "cost model" in notes[1]
