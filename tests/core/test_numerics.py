"""Rounding bounds (runlora_nb.common.numerics): every chain pair meets them, and two pairs differ by at most 2×."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from testutil import rel_err
from torch import nn

from runlora_nb import RunLoRALinear, valid_pairs
from runlora_nb.common.numerics import pair_difference_bound, rounding_bound, unit_roundoff

N, I, O, R = 96, 160, 112, 8
K = max(N, I, O, R)


def test_bound_formula_and_validation():
    u = torch.finfo(torch.float32).eps / 2
    assert unit_roundoff(torch.float32) == u
    assert rounding_bound(torch.float32, 100, 3) == pytest.approx(3 * (2 * 10 * u + u))
    # 16-bit results accumulate in fp32 but are stored in 16 bits
    ub = torch.finfo(torch.bfloat16).eps / 2
    assert rounding_bound(torch.bfloat16, 100) == pytest.approx(2 * 10 * u + ub)
    assert rounding_bound(torch.float32, 100, deterministic=True) == pytest.approx(
        100 * u / (1 - 100 * u) + u
    )
    assert rounding_bound(torch.bfloat16, 1000, deterministic=True, accumulate=torch.bfloat16) == math.inf
    assert pair_difference_bound(torch.float32, 100) == 2 * rounding_bound(torch.float32, 100, 3)
    for bad in ({"k": 0}, {"k": 10, "depth": 0}, {"k": 2.5}):
        with pytest.raises(ValueError, match="rounding_bound"):
            rounding_bound(torch.float32, **bad)
    with pytest.raises(TypeError, match="floating"):
        unit_roundoff(torch.int8)


def _run(pair, dtype, seed=0):
    """Output and gradients of one pair on fixed data, plus the float64 reference of the same."""
    g = torch.Generator().manual_seed(seed)
    base = nn.Linear(I, O, dtype=dtype)
    with torch.no_grad():
        base.weight.copy_(torch.randn(O, I, generator=g) / I**0.5)
        base.bias.copy_(torch.randn(O, generator=g))
    layer = RunLoRALinear(base, r=R, alpha=2 * R, chain=pair, adapter_dtype=dtype, init_lora_weights=False)
    with torch.no_grad():
        layer.lora_A.weight.copy_(torch.randn(R, I, generator=g) / I**0.5)
        layer.lora_B.weight.copy_(torch.randn(O, R, generator=g) / R**0.5)
    x = torch.randn(N, I, generator=g).to(dtype).requires_grad_()
    dy = torch.randn(N, O, generator=g).to(dtype)
    y = layer(x)
    y.backward(dy)
    got = [y, x.grad, layer.lora_A.weight.grad, layer.lora_B.weight.grad]
    w, bias = base.weight.double(), base.bias.double()
    a = layer.lora_A.weight.detach().double().requires_grad_()
    b = layer.lora_B.weight.detach().double().requires_grad_()
    x64 = x.detach().double().requires_grad_()
    y64 = x64 @ w.t() + bias + layer.scaling * (x64 @ a.t()) @ b.t()
    y64.backward(dy.double())
    return got, [y64, x64.grad, a.grad, b.grad]


PAIRS = list(valid_pairs(0.0))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("pair", PAIRS, ids="+".join)
def test_every_pair_meets_the_bound_against_float64(pair, dtype):
    got, ref = _run(pair, dtype)
    bound = rounding_bound(dtype, K, 3)
    for what, g, r in zip(("Y", "dX", "dA", "dB"), got, ref):
        assert rel_err(g, r) <= bound, f"{'+'.join(pair)} {what}: {rel_err(g, r):.3g} > {bound:.3g}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_two_pairs_differ_by_at_most_the_documented_amount(dtype):
    """What "same output" means across pairs (docs/numerics.md): within pair_difference_bound of each other."""
    results = {pair: _run(pair, dtype)[0] for pair in PAIRS}
    bound = pair_difference_bound(dtype, K)
    for p, q in itertools.combinations(PAIRS, 2):
        for what, a, b in zip(("Y", "dX", "dA", "dB"), results[p], results[q]):
            assert rel_err(a, b) <= bound, f"{p} vs {q} {what}: {rel_err(a, b):.3g} > {bound:.3g}"


def test_the_bound_is_not_vacuous():
    """An fp32 result with one intermediate rounded to bf16 (a real precision bug) must break the fp32 bound."""
    got, ref = _run(("fwd1", "bwd1"), torch.float32)
    broken = got[0].to(torch.bfloat16).float()
    assert rel_err(broken, ref[0]) > rounding_bound(torch.float32, K, 3)
