"""The memory ledger on CUDA: its prediction against the allocator's peak. Skipped without a CUDA device;
``scripts/gpu_check.sh`` runs it.

The saved bytes are fitted from hooks, so prediction and measurement agree on any device; the step's prediction
is a lower bound (it leaves out backward's transients and the allocator's slack), so it sits at or below the
allocator's peak of a real step, and not far below it: the ``step_ratio`` stays above a third.
"""

from __future__ import annotations

import pytest
import torch

from runlora_nb.assets.zoo import load_model
from runlora_nb.measure.memory_ledger import MemoryLedger

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(
        not torch.cuda.is_available(), reason="no CUDA device (scripts/gpu_check.sh on a GPU)"
    ),
]


@pytest.mark.parametrize("model_name", ["tiny-llama", "smollm2-135m"])
def test_cuda_prediction_against_the_allocator_peak(model_name):
    model, _ = load_model(model_name)
    ledger = MemoryLedger(model.to("cuda"), r=8, alpha=16, dropout=0.05, backends=("peft", "runlora"))
    df = ledger.compare(4, 128).set_index("backend")
    for backend in ("peft", "runlora"):
        row = df.loc[backend]
        assert row["cuda_peak_bytes"] > 0
        assert row["ratio"] == pytest.approx(1.0, rel=0.05), (backend, row["ratio"])
        assert 1 / 3 <= row["step_ratio"] <= 1.0, (backend, row["step_ratio"])
    # the reason RunLoRA exists, on the GPU too: it keeps fewer activation bytes than PEFT
    assert df.loc["runlora", "activation_bytes_measured"] < df.loc["peft", "activation_bytes_measured"]
