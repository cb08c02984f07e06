"""The fine-tuning engine on CUDA: the same run as on the CPU, in fp32 and under bf16 autocast.

Skipped without a CUDA device; ``scripts/gpu_check.sh`` runs it. A run is 20 steps; the CPU run is the
reference. Training amplifies rounding step by step, so the final validation loss is compared with a relative
tolerance of a few bf16 units of roundoff (bf16's u = 2^-8), generous for fp32 and the real test for bf16.
"""

from __future__ import annotations

import pytest
import torch

from runlora_nb.common.numerics import unit_roundoff
from runlora_nb.train import FineTuneConfig, FineTuner

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(
        not torch.cuda.is_available(), reason="no CUDA device (scripts/gpu_check.sh on a GPU)"
    ),
]

TOL = 8 * unit_roundoff(torch.bfloat16)


def _run(model: str, device: str, autocast: str, tmp_path) -> FineTuner:
    cfg = FineTuneConfig(model=model, steps=20, batch_size=2, seq_len=64, eval_interval=0, eval_batches=2,
                         dropout=0.0, lr=1e-3, sample_prompts=(), device=device, autocast=autocast,
                         output_dir=str(tmp_path / f"{device}-{autocast}"))  # fmt: skip
    tuner = FineTuner(cfg)
    tuner.run()
    return tuner


@pytest.mark.slow
@pytest.mark.parametrize("model", ["tiny-llama", "smollm2-135m"])
def test_a_cuda_run_reaches_the_cpu_runs_loss_in_fp32_and_bf16(model, tmp_path):
    cpu = _run(model, "cpu", "off", tmp_path)
    fp32 = _run(model, "cuda", "off", tmp_path)
    bf16 = _run(model, "cuda", "auto", tmp_path)
    assert fp32.device.type == "cuda" and {p.device.type for p in fp32.model.parameters()} == {"cuda"}
    assert bf16._autocast is torch.bfloat16  # auto on a bf16-capable GPU: bf16 autocast, fp32 adapters
    assert all(p.dtype == torch.float32 for p in bf16.model.parameters() if p.requires_grad)
    ref = cpu.history.val_loss
    assert cpu.history.evals[-1].val_loss < cpu.history.evals[0].val_loss  # the reference learned something
    assert abs(fp32.history.val_loss - ref) <= TOL * ref, (fp32.history.val_loss, ref)
    assert abs(bf16.history.val_loss - ref) <= TOL * ref, (bf16.history.val_loss, ref)
    peaks = [s.peak_mem_bytes for s in bf16.history.steps]
    assert all(p and p > 0 for p in peaks)  # the CUDA allocator's peak, not the host's RSS
    assert peaks[-1] <= torch.cuda.max_memory_allocated()
