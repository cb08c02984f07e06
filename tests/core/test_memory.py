"""What autograd keeps: RunLoRA saves X and nothing else of size N; PEFT keeps 2–3× that with dropout."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from runlora_nb import RunLoRALinear, valid_pairs
from runlora_nb.core.memory import SavedTensorRecorder

N, I, O, R = 2048, 1024, 1024, 16
X_BYTES = N * I * 4  # fp32


def peft_layer(dropout: float, dtype=torch.float32):
    peft = pytest.importorskip("peft")
    model = nn.Sequential(nn.Linear(I, O)).to(dtype)
    cfg = peft.LoraConfig(r=R, lora_alpha=2 * R, lora_dropout=dropout, target_modules=["0"])
    return peft.get_peft_model(model, cfg).train()


def saved_by(model: nn.Module, x: torch.Tensor) -> SavedTensorRecorder:
    with SavedTensorRecorder(model) as rec:
        model(x).sum().backward()
    return rec


@pytest.mark.parametrize("pair", list(valid_pairs(0.0)), ids="+".join)
def test_runlora_saves_only_x_at_dropout_0(pair):
    layer = RunLoRALinear(nn.Linear(I, O), r=R, alpha=2 * R, chain=pair)
    x = torch.randn(N, I, requires_grad=True)
    rec = saved_by(layer, x)
    acts = rec.unique()
    assert [a.shape for a in acts] == [(N, I)], acts
    assert rec.activation_bytes() == X_BYTES


@pytest.mark.parametrize("pair", list(valid_pairs(0.1)), ids="+".join)
def test_runlora_with_dropout_stays_within_7_percent_of_x(pair):
    layer = RunLoRALinear(nn.Linear(I, O), r=R, alpha=2 * R, dropout=0.1, chain=pair).train()
    rec = saved_by(layer, torch.randn(4, N // 4, I, requires_grad=True))
    assert rec.activation_bytes() <= 1.07 * X_BYTES
    assert rec.activation_bytes() == X_BYTES  # the mask is regenerated, nothing is stored for it


def test_runlora_bf16_base_fp32_adapters_keeps_the_bf16_x_only():
    layer = RunLoRALinear(nn.Linear(I, O).to(torch.bfloat16), r=R, alpha=2 * R, dropout=0.1)
    assert layer.lora_A.weight.dtype == torch.float32
    rec = saved_by(layer, torch.randn(N, I, dtype=torch.bfloat16, requires_grad=True))
    assert rec.activation_bytes() == N * I * 2


def test_runlora_saves_nothing_when_adapters_are_frozen():
    layer = RunLoRALinear(nn.Linear(I, O), r=R, alpha=2 * R)
    layer.requires_grad_(False)
    rec = saved_by(layer, torch.randn(64, I, requires_grad=True))
    assert rec.activation_bytes() == 0  # dX = dY·Wᵀ + s·T·Aᵀ needs no X


def test_peft_keeps_two_to_three_times_x():
    at0 = saved_by(peft_layer(0.0), torch.randn(N, I, requires_grad=True)).activation_bytes()
    at01 = saved_by(peft_layer(0.1), torch.randn(N, I, requires_grad=True)).activation_bytes()
    assert at0 >= X_BYTES + N * R * 4  # X and XA
    assert at01 >= 1.9 * X_BYTES  # plus the dropped copy of X and its mask
    mib = 2**20
    print(
        f"PEFT saved: p=0 {at0 / mib:.2f} MiB, p=0.1 {at01 / mib:.2f} MiB; RunLoRA: {X_BYTES / mib:.2f} MiB"
    )


def test_recorder_attributes_tensors_to_modules_and_spots_parameters():
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
    rec = saved_by(model, torch.randn(3, 8, requires_grad=True))
    table = rec.table()
    assert set(table["kind"]) >= {"activation", "parameter"}
    assert "2" in set(table["module"]) and "1" in set(table["module"])
    assert rec.activation_bytes() == table.loc[table.kind != "parameter", "bytes"].sum()
