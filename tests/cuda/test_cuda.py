"""RunLoRA on CUDA: every chain pair against a float64 reference, dropout masks, what autograd keeps, and a
converted PEFT model. Skipped where torch has no CUDA device (CI on CPU); ``scripts/gpu_check.sh`` runs them.

Tolerances come from the dtype and the reduction length (:func:`runlora_nb.common.numerics.rounding_bound`);
cuBLAS accumulates bf16/fp16 products in fp32, so the CPU bounds hold (TF32 stays off, torch's default).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from runlora_nb import RunLoRALinear, valid_pairs
from runlora_nb.common.numerics import rounding_bound
from runlora_nb.core.dropout import DropoutMask, draw_seed
from runlora_nb.core.memory import SavedTensorRecorder

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(
        not torch.cuda.is_available(), reason="no CUDA device (scripts/gpu_check.sh on a GPU)"
    ),
]

N, I, O, R = 256, 192, 160, 8
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _logits_bound(cfg, dtype) -> float:
    """Rounding bound of a tiny model's logits: the widest reduction, 4 matmuls per layer in series, the head."""
    k = max(getattr(cfg, a, 0) or 0 for a in ("hidden_size", "intermediate_size"))
    return rounding_bound(dtype, k, 4 * cfg.num_hidden_layers + 1)


def _rel(got: torch.Tensor, ref: torch.Tensor) -> float:
    return float((got.detach().double() - ref.detach()).norm() / ref.detach().norm().clamp_min(1e-30))


def _layer(pair, dtype, dropout=0.0) -> RunLoRALinear:
    torch.manual_seed(0)
    base = nn.Linear(I, O, bias=True).to("cuda", dtype)
    layer = RunLoRALinear(base, r=R, alpha=2 * R, dropout=dropout, chain=pair, init_lora_weights=False)
    return layer.to("cuda")


def _reference(layer, x, keep=None, scale=1.0):
    w = layer.base_layer.weight.detach().double()
    b = layer.base_layer.bias.detach().double()
    a = layer.lora_A.weight.detach().double().requires_grad_()
    bb = layer.lora_B.weight.detach().double().requires_grad_()
    x64 = x.detach().double().requires_grad_()
    xd = x64 if keep is None else x64 * keep * scale
    y = x64 @ w.t() + b + layer.scaling * (xd @ a.t()) @ bb.t()
    return y, x64, a, bb


def _check(layer, x, dtype, keep=None, scale=1.0):
    tol = rounding_bound(dtype, max(N, I, O, R), 3)
    x = x.detach().requires_grad_()
    y = layer(x)
    y_ref, x64, a64, b64 = _reference(layer, x, keep, scale)
    dy = torch.randn(y.shape, dtype=torch.float64, device="cuda")
    y.backward(dy.to(y.dtype))
    (y_ref * dy).sum().backward()
    for name, got, ref in (
        ("Y", y, y_ref),
        ("dX", x.grad, x64.grad),
        ("dA", layer.lora_A.weight.grad, a64.grad),
        ("dB", layer.lora_B.weight.grad, b64.grad),
    ):
        assert got.is_cuda and _rel(got, ref) <= tol, f"{name}: rel err {_rel(got, ref):.3g} > {tol:.3g}"


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("pair", list(valid_pairs(0.0)), ids="+".join)
def test_every_pair_matches_float64_on_cuda(pair, dtype):
    layer = _layer(pair, dtype)
    _check(layer, torch.randn(N, I, device="cuda", dtype=dtype), dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("pair", list(valid_pairs(0.1)), ids="+".join)
def test_dropout_pairs_match_with_the_same_mask_on_cuda(pair, dtype):
    layer = _layer(pair, dtype, dropout=0.1)
    x = torch.randn(N, I, device="cuda", dtype=dtype)
    torch.manual_seed(7)
    mask = DropoutMask(layer.dropout, draw_seed())
    keep = mask.keep((N, I), x.device)
    assert keep.is_cuda and 0.8 < float(keep.float().mean()) < 0.98
    torch.manual_seed(7)  # the layer draws the same seed
    _check(layer, x, dtype, keep, mask.keep_scale)


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_only_x_is_kept_for_backward_on_cuda(dropout):
    layer = _layer("auto", torch.bfloat16, dropout)
    x = torch.randn(N, I, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    with SavedTensorRecorder(layer) as rec:
        y = layer(x)
    assert rec.activation_bytes() <= x.numel() * x.element_size()  # X only: no X·A, no dropout copy
    y.sum().backward()
    assert layer.lora_A.weight.grad is not None


def test_from_peft_on_cuda_equals_peft():
    import copy

    import peft

    from runlora_nb import from_peft
    from runlora_nb.assets.zoo import load_model

    model, tok = load_model("tiny-llama")
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False)
    pm = peft.get_peft_model(model, cfg).to("cuda").eval()
    ref = copy.deepcopy(pm)
    from_peft(pm)
    ids = torch.randint(0, tok.vocab_size, (2, 32), device="cuda")
    with torch.no_grad():
        got, want = pm(input_ids=ids).logits, ref(input_ids=ids).logits
    # as on CPU (tests/integrations/test_inject.py): both are within the fp32 bound of the exact logits
    assert _rel(got, want.double()) <= 2 * _logits_bound(model.config, torch.float32)


@pytest.mark.parametrize("quant", ["nf4", "int8"])
def test_quantized_base_on_cuda_matches_peft(quant):
    pytest.importorskip("bitsandbytes")
    import copy

    import peft

    from runlora_nb import from_peft
    from runlora_nb.assets.zoo import load_model

    model, tok = load_model("tiny-llama", quantization=quant)
    model = model.to("cuda")
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False)
    pm = peft.get_peft_model(model, cfg).eval()
    ref = copy.deepcopy(pm)
    from_peft(pm)
    ids = torch.randint(0, tok.vocab_size, (2, 32), device="cuda")
    with torch.no_grad():
        got, want = pm(input_ids=ids).logits.float(), ref(input_ids=ids).logits.float()
    # both dequantize the same weights; the products round in bnb's 16-bit compute dtype
    assert _rel(got, want.double()) <= 2 * _logits_bound(model.config, torch.bfloat16)
    loss = pm(input_ids=ids, labels=ids).loss
    loss.backward()
    assert all(p.grad is not None for n, p in pm.named_parameters() if p.requires_grad)
