"""Quantized bases (bitsandbytes nf4 / fp4 / int8): gradients, every chain, the CPU repack trap, merge."""

from __future__ import annotations

import itertools
import warnings

import pytest
import torch
from testutil import rel_err

bnb = pytest.importorskip("bitsandbytes")

from runlora_nb import RunLoRALinear, valid_pairs  # noqa: E402
from runlora_nb.assets.zoo import load_model  # noqa: E402
from runlora_nb.common.numerics import rounding_bound  # noqa: E402
from runlora_nb.core.base import describe_base  # noqa: E402
from runlora_nb.core.quant import dequantize, guard_cpu_repack, quantized_linear  # noqa: E402
from runlora_nb.integrations.inject import apply_runlora, runlora_layers  # noqa: E402
from runlora_nb.planning.planner import plan_chains  # noqa: E402

I, O, R = 128, 64, 8
# A chain pair's bound (3 products in series, longest reduction max(N, i, o, r)) plus one more rounding: the weight is
# dequantized to the compute dtype, while the reference uses it exactly (float64). See docs/numerics.md.
TOL = {dt: rounding_bound(dt, max(21, I, O, R), 4) for dt in (torch.float32, torch.bfloat16, torch.float16)}
CASES = [
    ("nf4", True, torch.float32),
    ("nf4", False, torch.bfloat16),
    ("fp4", True, torch.float16),
    ("fp4", False, torch.float32),
    ("nf4", True, torch.bfloat16),
    ("int8", False, torch.float32),
    ("int8", False, torch.bfloat16),  # int8 has no compute dtype: products follow the input's dtype
]


def q_layer(kind, double=True, compute=torch.float32, bias=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(O, I, generator=g) / I**0.5
    b = torch.randn(O, generator=g) * 0.1 if bias else None
    return quantized_linear(w, b, kind, compute_dtype=compute, double_quant=double)


def reference_grads(layer: RunLoRALinear, x: torch.Tensor, dy: torch.Tensor):
    """float64 LoRA on the dequantized weight (the float reference)."""
    w = dequantize(layer.base_layer, layer.info, torch.float64)
    bias = layer.bias.detach().double() if layer.bias is not None else 0
    a = layer.lora_A.weight.detach().double().requires_grad_()
    b = layer.lora_B.weight.detach().double().requires_grad_()
    x64 = x.detach().double().requires_grad_()
    y = x64 @ w.t() + bias + layer.scaling * (x64 @ a.t()) @ b.t()
    (y * dy.double()).sum().backward()
    return y, x64.grad, a.grad, b.grad


@pytest.mark.parametrize(("kind", "double", "compute"), CASES, ids=lambda v: str(v).removeprefix("torch."))
def test_gradients_match_the_dequantized_float_reference(kind, double, compute):
    base = q_layer(kind, double, compute)
    info = describe_base(base)
    assert info.kind == kind and info.quantized
    for pair in valid_pairs(0.0):
        layer = RunLoRALinear(base, r=R, alpha=2 * R, chain=pair, init_lora_weights=False)
        x = torch.randn(3, 7, I, generator=torch.Generator().manual_seed(1)).to(compute).requires_grad_()
        dy = torch.randn(3, 7, O, generator=torch.Generator().manual_seed(2))
        y = layer(x)
        assert y.dtype == compute
        y.backward(dy.to(y.dtype))
        y_ref, dx, da, db = reference_grads(layer, x, dy)
        tol = TOL[compute]
        assert rel_err(y, y_ref) < tol, pair
        assert rel_err(x.grad, dx) < tol, pair
        assert rel_err(layer.lora_A.weight.grad, da) < tol, pair
        assert rel_err(layer.lora_B.weight.grad, db) < tol, pair


def test_dequantized_weight_is_never_saved_for_backward():
    from runlora_nb.core.memory import SavedTensorRecorder

    layer = RunLoRALinear(q_layer("nf4"), r=R, alpha=2 * R, dropout=0.1).train()
    x = torch.randn(64, I, requires_grad=True)
    with SavedTensorRecorder(layer) as rec:
        y = layer(x)
    assert rec.activation_bytes() == x.numel() * 4  # X only: no (O, I) float weight among the saved tensors
    y.sum().backward()


def test_unguarded_layer_shows_the_trap_on_avx512bf16_cpus():
    """Documents why the guard exists: an eval forward repacks the weight in place on such CPUs."""
    raw = bnb.nn.Linear4bit(I, O, compute_dtype=torch.bfloat16, quant_type="nf4")
    raw.weight = bnb.nn.Params4bit(torch.randn(O, I) / 10, requires_grad=False, quant_type="nf4", module=raw)
    raw = raw.to("cpu").eval()
    if not raw.support_avx512bf16_for_cpu:
        pytest.skip("this CPU has no AVX512-BF16: bitsandbytes never repacks here (the guard still applies)")
    with torch.no_grad():
        raw(torch.randn(2, I, dtype=torch.bfloat16))
    assert getattr(raw.weight.quant_state, "packing_format_for_cpu", False)
    with pytest.raises(RuntimeError, match=r"repacked in place.*Reload the model"):
        RunLoRALinear(raw, r=R)


@pytest.mark.parametrize("avx512bf16", [True, False], ids=["avx512bf16", "no-avx512bf16"])
def test_eval_forward_then_train_step_gives_correct_gradients(avx512bf16):
    model, _tok = load_model("tiny-llama", dtype="bf16", quantization="nf4")
    for m in model.modules():  # simulate both kinds of CPU: the guard must make them behave the same
        if hasattr(m, "support_avx512bf16_for_cpu"):
            m.support_avx512bf16_for_cpu = avx512bf16
    apply_runlora(model, r=4, alpha=8, target_modules="all-linear", init_lora_weights=False)
    ids = torch.randint(3, 200, (2, 12), generator=torch.Generator().manual_seed(0))
    model.eval()
    with torch.no_grad():
        model(input_ids=ids)  # the trap: an eval forward with an input that needs no grad
    for m in model.modules():
        if hasattr(m, "support_avx512bf16_for_cpu"):
            assert not getattr(m.weight.quant_state, "packing_format_for_cpu", False)
    model.train()
    model(input_ids=ids, labels=ids).loss.backward()
    layers = list(runlora_layers(model))
    assert all(
        layer.lora_A.weight.grad is not None and layer.lora_B.weight.grad is not None for _, layer in layers
    )
    # the first layer's input gradient flows through every quantized layer above it
    first = layers[0][1]
    assert first.lora_A.weight.grad.abs().sum() > 0
    # and the layer still computes against the right weight
    layer = layers[-1][1]
    w = dequantize(layer.base_layer, layer.info, torch.float32)
    x = torch.randn(2, layer.in_features)
    with torch.no_grad():
        ref = x @ w.t() + layer.scaling * (x @ layer.lora_A.weight.t()) @ layer.lora_B.weight.t()
        # bf16 compute: a chain pair (3), the dequantized weight (1) and the fp32 input (1) rounded to bf16
        assert rel_err(layer(x), ref) < rounding_bound(torch.bfloat16, layer.in_features, 5)


@pytest.mark.parametrize("kind", ["nf4", "int8"])
def test_merge_on_quantized_base_warns_and_stays_close(kind):
    layer = RunLoRALinear(q_layer(kind), r=R, alpha=2 * R, init_lora_weights=False)
    with torch.no_grad():
        layer.lora_B.weight.mul_(0.05)
    x = torch.randn(16, I)
    with torch.no_grad():
        before = layer(x)
        with pytest.warns(UserWarning, match="requantizes"):
            layer.merge()
        after = layer(x)
    assert layer.merged and describe_base(layer.base_layer).kind == kind
    assert rel_err(after, before) < 0.15  # rounded to the quantization grid, as PEFT's merge is


def test_planner_costs_the_dequantization():
    shape = (2048, 1024, 1024, 16)
    fp = plan_chains(*shape, mode="auto")
    q = plan_chains(*shape, mode="auto", quant="nf4")
    assert q.predicted_s > fp.predicted_s


def test_guard_counts_layers_and_is_idempotent():
    model, _ = load_model("tiny-llama", quantization="nf4")
    n = guard_cpu_repack(model)
    assert n == 14 and guard_cpu_repack(model) == 14
    assert all(
        not m.support_avx512bf16_for_cpu for m in model.modules() if hasattr(m, "support_avx512bf16_for_cpu")
    )


@pytest.mark.parametrize(("quant", "dtype"), list(itertools.product(["nf4", "int8"], ["fp32", "bf16"])))
def test_quantized_tiny_model_trains(quant, dtype):
    model, _tok = load_model("tiny-llama", dtype=dtype, quantization=quant)
    apply_runlora(model, r=4, alpha=8, target_modules="all-linear").train()
    ids = torch.randint(3, 200, (2, 16), generator=torch.Generator().manual_seed(0))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        losses = []
        for _ in range(3):
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            opt.step()
            opt.zero_grad()
            losses.append(float(loss.detach()))
    assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] < losses[0]


def test_bitsandbytes_import_notice_is_silenced_and_nothing_else():
    """bitsandbytes' kernels-community notice is known noise: importing it must not print it on every CLI run."""
    import subprocess
    import sys

    code = "import runlora_nb, bitsandbytes, logging; logging.getLogger('bitsandbytes.backends.cpu.ops').warning('other')"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "kernels-community" not in out.stderr and "other" in out.stderr


def test_int8_cast_notice_is_logged_once_per_process(caplog, monkeypatch):
    import logging

    from runlora_nb.core import quant

    log = logging.getLogger("bitsandbytes.autograd._functions")
    monkeypatch.setattr(log, "filters", [])
    quant.quiet_bnb_logs()
    with caplog.at_level(logging.WARNING):
        for _ in range(5):  # one per layer call
            log.warning("MatMul8bitLt: inputs will be cast from %s to float16 during quantization", "float32")
        log.warning("something else")
    texts = [r.getMessage() for r in caplog.records]
    assert sum("MatMul8bitLt" in t for t in texts) == 1 and "something else" in texts
    quant.quiet_bnb_logs()  # idempotent: no second filter
    assert len(log.filters) == 1
