"""The memory ledger: predicted activation bytes against exact saved_tensors_hooks measurements, and the largest
batch against a real training run's peak RSS."""

from __future__ import annotations

import pytest
import torch

from runlora_nb.assets.zoo import load_model
from runlora_nb.common.sysmem import peak_rss_bytes, reset_peak_rss, rss_bytes
from runlora_nb.measure.memory_ledger import MemoryLedger, _trim_heap, block_of
from runlora_nb.measure.model_race import adapter_variants, random_batch

# two batch shapes per model, both beyond the probes (B = 1, 2; S = 8, 16, 24); SmolLM2's kept small for CI
SHAPES = {"tiny-llama": [(2, 64), (4, 128)], "smollm2-135m": [(1, 48), (3, 64)]}


@pytest.mark.parametrize("name", list(SHAPES))
def test_activation_prediction_within_10_percent_of_the_measurement(name):
    model, _ = load_model(name)
    ledger = MemoryLedger(model, r=8, alpha=16, dropout=0.05, probe_seq=8)
    for batch, seq in SHAPES[name]:
        df = ledger.compare(batch, seq).set_index("backend")
        assert set(df.index) == {"peft", "runlora"}
        assert ((df["ratio"] - 1).abs() <= 0.10).all(), df.to_string()
        # the step's peak is an OS / allocator reading, independent of the hooks the fit was made on
        assert (df["step_bytes_measured"] > 0).all() and df["step_ratio"].notna().all(), df.to_string()
        # runlora_nb keeps less than PEFT (no dropout copy, no X·A)
        assert df.loc["runlora", "activation_bytes_measured"] < df.loc["peft", "activation_bytes_measured"]
    pred = ledger.predict(*SHAPES[name][-1]).set_index("backend")
    assert (pred["fit_residual"] < 1e-6).all()  # the polynomial holds on the probes themselves
    row = pred.loc["runlora"]
    assert row["optimizer_bytes"] == 2 * row["adapter_bytes"] and row["grad_bytes"] == row["adapter_bytes"]
    parts = [
        "weights_bytes",
        "adapter_bytes",
        "grad_bytes",
        "optimizer_bytes",
        "activation_bytes",
        "process_bytes",
    ]
    assert row["total_bytes"] == sum(row[p] for p in parts) + row["temporaries_bytes"]


def test_per_block_and_largest_batch():
    model, _ = load_model("tiny-llama")
    ledger = MemoryLedger(model, backends=("runlora",))
    blocks = ledger.per_block(2, 64, "runlora")
    assert "model.layers.0" in set(blocks["block"]) and "other" in set(blocks["block"])
    assert (blocks["predicted_bytes"] == blocks["measured_bytes"]).all()
    total3 = int(ledger.predict(3, 64)["total_bytes"].iloc[0])
    assert ledger.largest_batch(total3, 64, "runlora", measure=False) == 3
    assert ledger.largest_batch(total3 - 1, 64, "runlora", measure=False) == 2
    assert ledger.largest_batch(1, 64, "runlora", measure=False) == 0
    assert ledger.largest_batch(1, 64, "runlora") == 0  # the process alone is over budget: nothing is run


def test_the_largest_batch_fits_a_real_training_run_in_the_budget():
    """A real run at the answer (fresh adapters, AdamW, three steps) peaks within the budget by the OS's count.

    The budget is this process's RSS plus 200 MiB; the prediction alone (a lower bound) answers a batch several
    times larger, whose real run would not fit.
    """
    if not reset_peak_rss():
        pytest.skip("the peak RSS can only be reset on Linux (/proc/self/clear_refs)")
    model, _ = load_model("tiny-llama")
    ledger = MemoryLedger(model, r=8, alpha=16, backends=("runlora",))
    seq, budget = 64, rss_bytes() + 200 * 2**20
    batch = ledger.largest_batch(budget, seq, "runlora")
    assert batch >= 4 and ledger.last_fit["verified"], ledger.last_fit
    assert ledger.largest_batch(budget, seq, "runlora", measure=False) > 2 * batch
    m = adapter_variants(
        model, r=8, alpha=16, dropout=0.05, target_modules="all-linear", backends=("runlora",)
    )
    m = m["runlora"]
    opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-4)
    _trim_heap()  # a training process does not hold the heap the ledger's own probes left behind
    reset_peak_rss()
    for _ in range(3):
        m(**random_batch(m, batch, seq)).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    assert peak_rss_bytes() <= budget, (peak_rss_bytes() - budget, ledger.last_fit)


def test_block_of_and_bad_input():
    assert block_of("model.layers.3.mlp.up_proj.lora_A") == "model.layers.3"
    assert block_of("transformer.h.11.attn") == "transformer.h.11"
    assert block_of("lm_head") == "other"
    model, _ = load_model("tiny-llama")
    with pytest.raises(ValueError, match="unknown backend 'lora'"):
        MemoryLedger(model, backends=("lora",))
    ledger = MemoryLedger(model, backends=("runlora",))
    with pytest.raises(ValueError, match="batch must be a positive int"):
        ledger.predict(0, 64)
    with pytest.raises(ValueError, match="budget_bytes must be > 0"):
        ledger.largest_batch(0, 64, "runlora")


def test_a_sequence_past_the_positions_is_refused_not_predicted():
    model, _ = load_model("tiny-llama")  # 512 positions (max_position_embeddings)
    ledger = MemoryLedger(model, backends=("runlora",))
    for call in (lambda: ledger.predict(1, 100000), lambda: ledger.largest_batch(2**30, 100000, "runlora")):
        with pytest.raises(
            ValueError, match=r"seq_len=100000 exceeds the 512 positions.*max_position_embeddings"
        ):
            call()
    assert len(ledger.predict(1, 512)) == 1  # the limit itself is fine
