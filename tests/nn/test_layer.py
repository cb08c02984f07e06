"""RunLoRALinear against a plain float64 autograd LoRA, for every valid chain pair and setting."""

from __future__ import annotations

import itertools
import warnings

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from testutil import rel_err
from torch import nn
from transformers.pytorch_utils import Conv1D

from runlora_nb import RunLoRALinear, valid_pairs
from runlora_nb.common.numerics import pair_difference_bound, rounding_bound
from runlora_nb.core.dropout import DropoutMask, draw_seed
from runlora_nb.nn import layer as layer_module

N_TOK, I, O, R = 24, 20, 12, 4
REQUIRES = list(itertools.product([False, True], repeat=3))  # (X, A, B)
# Rounding bound of a chain pair on these shapes: longest reduction max(N, i, o, r), at most 3 products in series
# (e.g. (X·A)·B added to X·W); see runlora_nb.common.numerics and docs/numerics.md.
TOL = {
    dt: rounding_bound(dt, max(N_TOK, I, O, R), 3) for dt in (torch.float32, torch.bfloat16, torch.float16)
}
DTYPE_CASES = {
    "fp32": (torch.float32, torch.float32),
    "bf16": (torch.bfloat16, torch.bfloat16),
    "bf16+fp32-adapters": (torch.bfloat16, torch.float32),
    "fp16": (torch.float16, torch.float16),
}


def make_base(kind: str, i: int, o: int, bias: bool, dtype: torch.dtype) -> nn.Module:
    if kind == "linear":
        return nn.Linear(i, o, bias=bias, dtype=dtype)
    conv = Conv1D(o, i).to(dtype)  # weight (i, o)
    nn.init.normal_(conv.weight, std=0.2)
    if bias:
        nn.init.normal_(conv.bias, std=0.2)
    else:
        conv.bias = None
    return conv


def make_layer(kind="linear", bias=True, dtype=torch.float32, adapter_dtype=None, i=I, o=O, r=R, **kw):
    layer = RunLoRALinear(
        make_base(kind, i, o, bias, dtype),
        r=r,
        alpha=2 * r,
        adapter_dtype=adapter_dtype,
        init_lora_weights=False,
        **kw,
    )
    return layer


def make_input(layout: str, dtype: torch.dtype, i: int = I, n: int = N_TOK) -> torch.Tensor:
    if layout == "2d":
        return torch.randn(n, i).to(dtype)
    if layout == "3d":
        return torch.randn(2, n // 2, i).to(dtype)
    if layout == "noncontig-2d":
        return torch.randn(i, n).to(dtype).t()
    if layout == "noncontig-3d":
        return torch.randn(2, i, n // 2).to(dtype).transpose(1, 2)
    raise ValueError(layout)


def reference(
    layer: RunLoRALinear, x: torch.Tensor, keep: torch.Tensor | None = None, keep_scale: float = 1.0
):
    """Plain autograd LoRA in float64 on copies of the layer's tensors: (y, x64, a64, b64)."""
    w = layer.base_layer.weight.detach().double()
    w = w.t() if layer.info.conv1d else w  # (o, i)
    bias = None if layer.bias is None else layer.bias.detach().double()
    a = layer.lora_A.weight.detach().double().requires_grad_()
    b = layer.lora_B.weight.detach().double().requires_grad_()
    x64 = x.detach().double().requires_grad_()
    x2 = x64.reshape(-1, x.shape[-1])
    xd = x2 if keep is None else x2 * keep * keep_scale
    y = x2 @ w.t() + (0 if bias is None else bias) + layer.scaling * (xd @ a.t()) @ b.t()
    return y.reshape(*x.shape[:-1], -1), x64, a, b


def magnitudes(layer, x, dy, keep=None, keep_scale=1.0):
    """The reference on absolute values, |X||W| + |b| + s(|D(X)||A|)|B|, and its gradients for |dY|: the scale
    rounding errors are relative to (Higham §3.5), which stays meaningful when the exact result cancels."""
    w = layer.base_layer.weight.detach().double().abs()
    w = w.t() if layer.info.conv1d else w
    bias = 0 if layer.bias is None else layer.bias.detach().double().abs()
    a = layer.lora_A.weight.detach().double().abs().requires_grad_()
    b = layer.lora_B.weight.detach().double().abs().requires_grad_()
    x2 = x.detach().double().abs().reshape(-1, x.shape[-1]).requires_grad_()
    xd = x2 if keep is None else x2 * keep * keep_scale
    y = x2 @ w.t() + bias + layer.scaling * (xd @ a.t()) @ b.t()
    (y * dy.detach().double().abs().reshape(y.shape)).sum().backward()
    return {"Y": y, "dX": x2.grad.reshape(x.shape), "dA": a.grad, "dB": b.grad}


def check_against_reference(layer, x, requires, tol, dropout_seed=None, relative_to_magnitudes=False):
    """Run layer and reference on x with requires_grad flags (X, A, B) and compare output and grads.

    The error is relative to the reference's norm, or with ``relative_to_magnitudes`` to the norm of
    :func:`magnitudes` (for tiny random shapes, where a result of a few elements may cancel).
    """
    rx, ra, rb = requires
    x = x.detach().requires_grad_(rx)
    layer.lora_A.weight.requires_grad_(ra)
    layer.lora_B.weight.requires_grad_(rb)
    layer.zero_grad(set_to_none=True)
    keep, scale = None, 1.0
    if dropout_seed is not None:
        torch.manual_seed(dropout_seed)
        mask = DropoutMask(layer.dropout, draw_seed())
        keep, scale = mask.keep((x.numel() // x.shape[-1], x.shape[-1]), x.device), mask.keep_scale
        torch.manual_seed(dropout_seed)  # the layer draws the same seed
    y = layer(x)
    y_ref, x64, a64, b64 = reference(layer, x, keep, scale)
    assert y.shape == y_ref.shape and y.dtype == layer._compute_dtypes("cpu", layer.lora_A.weight.dtype)[0]
    dy = torch.randn(y.shape, dtype=torch.float64)
    mags = magnitudes(layer, x, dy, keep, scale) if relative_to_magnitudes else None

    def err(got, ref, what):
        return rel_err(got, ref) if mags is None else float((got.double() - ref).norm() / mags[what].norm())

    assert err(y, y_ref, "Y") <= tol, f"output rel err {err(y, y_ref, 'Y')}"
    if rx or ra or rb:
        y.backward(dy.to(y.dtype))
    (y_ref * dy).sum().backward()
    for flag, got, ref, what in (
        (rx, x.grad, x64.grad, "dX"),
        (ra, layer.lora_A.weight.grad, a64.grad, "dA"),
        (rb, layer.lora_B.weight.grad, b64.grad, "dB"),
    ):
        if flag:
            assert got is not None, f"{what} missing"
            assert got.shape == ref.shape
            assert err(got, ref, what) <= tol, f"{what} rel err {err(got, ref, what)}"
        else:
            assert got is None, f"{what} computed though not required"
    assert layer.base_layer.weight.grad is None


@pytest.mark.parametrize("pair", list(valid_pairs(0.0)), ids="+".join)
@pytest.mark.parametrize("dtype_case", list(DTYPE_CASES))
@pytest.mark.parametrize("kind", ["linear", "conv1d"])
def test_every_pair_matches_float64_reference(pair, dtype_case, kind):
    base_dtype, adapter_dtype = DTYPE_CASES[dtype_case]
    tol = TOL[base_dtype]
    for bias, layout, requires in itertools.product(
        [True, False], ["2d", "3d", "noncontig-2d", "noncontig-3d"], REQUIRES
    ):
        layer = make_layer(kind, bias, base_dtype, adapter_dtype, chain=pair)
        check_against_reference(layer, make_input(layout, base_dtype), requires, tol)


@pytest.mark.parametrize("pair", list(valid_pairs(0.1)), ids="+".join)
@pytest.mark.parametrize("dtype_case", list(DTYPE_CASES))
@pytest.mark.parametrize("kind", ["linear", "conv1d"])
def test_dropout_pairs_match_reference_with_the_same_mask(pair, dtype_case, kind):
    base_dtype, adapter_dtype = DTYPE_CASES[dtype_case]
    for requires, layout in itertools.product(REQUIRES, ["3d", "noncontig-2d"]):
        layer = make_layer(kind, True, base_dtype, adapter_dtype, chain=pair, dropout=0.3)
        check_against_reference(
            layer, make_input(layout, base_dtype), requires, TOL[base_dtype], dropout_seed=7
        )


MIXED_ONLY = [p for p in valid_pairs(0.1, allow_merged=False, mixed=True) if p not in valid_pairs(0.1)]


@pytest.mark.parametrize("pair", MIXED_ONLY, ids="+".join)
@pytest.mark.parametrize("dropout", [0.0, 0.3])
@pytest.mark.parametrize("kind", ["linear", "conv1d"])
def test_mixed_dtype_pairs_match_float64_reference(pair, dropout, kind):
    """The pairs that run the rank-r path in the base dtype (fp32 adapters on a bf16 base only) meet the bf16
    bound on every layout and gradient subset, with and without dropout."""
    base_dtype, adapter_dtype = DTYPE_CASES["bf16+fp32-adapters"]
    for bias, layout, requires in itertools.product([True, False], ["3d", "noncontig-2d"], REQUIRES):
        layer = make_layer(kind, bias, base_dtype, adapter_dtype, chain=pair, dropout=dropout)
        seed = 7 if dropout else None
        check_against_reference(
            layer, make_input(layout, base_dtype), requires, TOL[base_dtype], dropout_seed=seed
        )


def test_dropout_really_drops_and_eval_does_not():
    layer = make_layer(dropout=0.5)
    x = torch.randn(64, I)
    torch.manual_seed(1)
    y1 = layer(x)
    torch.manual_seed(2)
    y2 = layer(x)
    assert not torch.allclose(y1, y2), "different seeds must give different masks"
    torch.manual_seed(1)
    torch.testing.assert_close(layer(x), y1)  # same seed, same mask
    layer.eval()
    y_eval = layer(x)
    ref, *_ = reference(layer, x)
    assert rel_err(y_eval, ref) < TOL[torch.float32]


def test_dropout_mask_statistics():
    mask = DropoutMask(0.1, 12345)
    keep = mask.keep((1000, 1000), torch.device("cpu"))
    frac = keep.float().mean().item()
    assert abs(frac - 0.9) < 0.002
    assert abs(mask.keep_scale * frac - 1.0) < 0.003
    # rows and columns are not correlated: per-row keep rates spread like a binomial
    rows = keep.float().mean(1)
    assert 0.005 < rows.std().item() < 0.015


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    n=st.integers(1, 40),
    i=st.integers(1, 24),
    o=st.integers(1, 24),
    r=st.integers(1, 6),
    pair_index=st.integers(0, 9),
    requires=st.sampled_from(REQUIRES),
    dropout=st.sampled_from([0.0, 0.25]),
    kind=st.sampled_from(["linear", "conv1d"]),
    bias=st.booleans(),
)
def test_random_shapes_match_reference(n, i, o, r, pair_index, requires, dropout, kind, bias):
    pairs = list(valid_pairs(dropout))
    pair = pairs[pair_index % len(pairs)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # r > min(i, o) warns; allowed here
        layer = make_layer(kind, bias, torch.float64, None, i=i, o=o, r=r, chain=pair, dropout=dropout)
    seed = 3 if dropout else None
    # float64 on both sides: the layer and the float64 reference each round, so they may differ by twice the bound;
    # relative to the magnitudes, since a result of one or two elements may cancel (dB of shape (1, 1), say)
    tol = pair_difference_bound(torch.float64, max(n, i, o, r))
    x = torch.randn(n, i, dtype=torch.float64)
    check_against_reference(layer, x, requires, tol, dropout_seed=seed, relative_to_magnitudes=True)


@pytest.mark.parametrize("chain", ["auto", "flops", "timed"])
def test_planner_modes_give_correct_results(chain):
    layer = make_layer(chain=chain, dropout=0.2)
    check_against_reference(
        layer, make_input("3d", torch.float32), (True, True, True), TOL[torch.float32], dropout_seed=5
    )
    layer.eval()
    check_against_reference(layer, make_input("3d", torch.float32), (True, True, True), TOL[torch.float32])


def test_default_init_is_peft_and_a_noop():
    base = nn.Linear(I, O)
    layer = RunLoRALinear(base, r=R, alpha=8)
    assert layer.lora_A.weight.shape == (R, I) and layer.lora_B.weight.shape == (O, R)
    assert torch.count_nonzero(layer.lora_B.weight) == 0 and torch.count_nonzero(layer.lora_A.weight) > 0
    bound = 1 / I**0.5  # kaiming_uniform(a=√5) on (r, i) is U(-1/√i, 1/√i)
    assert layer.lora_A.weight.abs().max() <= bound
    x = torch.randn(5, I)
    torch.testing.assert_close(layer(x), base(x))
    assert layer.base_layer is base and layer.weight is base.weight  # wrapped, not copied
    assert not base.weight.requires_grad and not base.bias.requires_grad
    assert layer.scaling == 2.0
    assert RunLoRALinear(nn.Linear(I, O), r=4, alpha=8, use_rslora=True).scaling == pytest.approx(4.0)


def test_default_adapter_dtype_follows_peft():
    assert make_layer(dtype=torch.bfloat16).lora_A.weight.dtype == torch.float32
    assert make_layer(dtype=torch.float16).lora_B.weight.dtype == torch.float32
    assert make_layer(dtype=torch.float64).lora_A.weight.dtype == torch.float64
    assert (
        make_layer(dtype=torch.bfloat16, adapter_dtype=torch.bfloat16).lora_A.weight.dtype == torch.bfloat16
    )


def test_mixed_dtype_matches_peft_numerics():
    """bf16 base with fp32 adapters: PEFT adds the fp32 adapter output to the bf16 base output in fp32."""
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 48)).to(torch.bfloat16)
    pm = peft.get_peft_model(
        model, peft.LoraConfig(r=8, lora_alpha=16, target_modules=["0"], init_lora_weights=False)
    )
    peft_layer = pm.base_model.model[0]
    ours = RunLoRALinear(peft_layer.base_layer, r=8, alpha=16, chain=("fwd1", "bwd1"))
    ours.lora_A.weight = peft_layer.lora_A["default"].weight
    ours.lora_B.weight = peft_layer.lora_B["default"].weight
    assert ours.lora_A.weight.dtype == torch.float32
    x = torch.randn(4, 16, 64).to(torch.bfloat16)
    y_peft, y_ours = peft_layer(x), ours(x)
    assert y_ours.dtype == y_peft.dtype == torch.bfloat16
    # both sides compute in fp32 and round the result to bf16 once: they differ by at most two such roundings
    assert rel_err(y_ours, y_peft) < 2 * rounding_bound(torch.bfloat16, 64, 1, accumulate=torch.float32)


@pytest.mark.parametrize("kind", ["linear", "conv1d"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_merge_and_unmerge(kind, dtype):
    layer = make_layer(kind, True, dtype)
    x = make_input("3d", dtype)
    y = layer(x).detach()
    w0 = layer.weight.detach().clone()
    layer.merge()
    assert layer.merged
    y_merged = layer(x)
    assert rel_err(y_merged, y) < pair_difference_bound(dtype, max(N_TOK, I, O, R))  # two orders of products
    layer.unmerge()
    assert not layer.merged
    assert rel_err(layer.weight, w0) < rounding_bound(
        dtype, R, 2
    )  # W + sAB − sAB: two roundings to the dtype
    with pytest.warns(UserWarning, match="not merged"):
        layer.unmerge()


def test_disable_adapter_gives_base_output():
    layer = make_layer()
    x = torch.randn(3, I)
    layer.enable_adapter(False)
    torch.testing.assert_close(layer(x), layer.base_layer(x))
    layer.enable_adapter(True)
    assert not torch.allclose(layer(x), layer.base_layer(x))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_autocast_runs_in_the_autocast_dtype(dtype):
    layer = make_layer(dtype=dtype)
    x = torch.randn(2, 6, I, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    assert y.dtype == torch.bfloat16
    ref, *_ = reference(layer, x)
    assert rel_err(y, ref) < 3e-2
    y.float().sum().backward()
    assert x.grad.dtype == torch.float32 and layer.lora_A.weight.grad.dtype == layer.lora_A.weight.dtype
    assert layer.lora_B.weight.grad is not None


def test_plan_reports_pair_and_reason():
    layer = make_layer(i=1024, o=1024, r=16)
    plan = layer.plan(2048)
    assert (plan.fwd, plan.bwd) in set(valid_pairs(0.0))
    assert plan.reason and plan.flops > 0
    explicit = make_layer(chain=("fwd1", "bwd5")).plan(10)
    assert explicit.pair == ("fwd1", "bwd5") and explicit.mode == "explicit"
    flops_plan = make_layer(i=1024, o=1024, r=16, chain="flops").plan(4096)
    assert flops_plan.pair == ("fwd2", "bwd5") and "FLOP" in flops_plan.reason
    assert make_layer(dropout=0.1, chain="flops").plan(4096).pair == ("fwd1", "bwd1")


def test_bias_gradient_when_the_user_trains_it():
    layer = make_layer()
    layer.base_layer.bias.requires_grad_(True)
    x = torch.randn(5, I)
    layer(x).sum().backward()
    torch.testing.assert_close(layer.base_layer.bias.grad, torch.full((O,), 5.0))


# ------------------------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"r": 0}, "rank r must be a positive integer"),
        ({"r": -3}, "rank r must be a positive integer"),
        ({"alpha": 0}, "alpha must be > 0"),
        ({"dropout": 1.0}, r"dropout must be in \[0, 1\)"),
        ({"dropout": -0.1}, r"dropout must be in \[0, 1\)"),
        ({"chain": "fastest"}, "not a planner mode"),
        ({"chain": ("fwd9", "bwd1")}, "unknown chain pair.*valid pairs here"),
        ({"chain": ("fwd2", "bwd1"), "dropout": 0.1}, r"W \+ sAB.*dropout=0.1.*\('fwd1', 'bwd1'\)"),
        ({"chain": ("fwd1", "bwd4"), "dropout": 0.1}, "cannot apply dropout"),
    ],
)
def test_bad_arguments_raise_clear_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        RunLoRALinear(nn.Linear(I, O), **{"r": 4, **kwargs}, name="model.layers.0.q_proj")


def test_error_names_the_layer():
    with pytest.raises(ValueError, match=r"^model\.layers\.0\.q_proj: rank"):
        RunLoRALinear(nn.Linear(I, O), r=0, name="model.layers.0.q_proj")


def test_unsupported_base_is_a_type_error():
    with pytest.raises(TypeError, match=r"wraps torch\.nn\.Linear.*not torch\.nn\.modules\.conv\.Conv2d"):
        RunLoRALinear(nn.Conv2d(3, 3, 3), r=2)


def test_wrong_input_width_is_explained():
    layer = make_layer(name="encoder.fc")
    with pytest.raises(ValueError, match=r"encoder.fc: input has last dimension 7 .*in_features=20"):
        layer(torch.randn(3, 7))


def test_rank_above_min_dim_warns_but_works(monkeypatch):
    monkeypatch.setattr(layer_module, "_RANK_WARNED", set())
    with pytest.warns(UserWarning, match="exceeds min"):
        layer = RunLoRALinear(nn.Linear(8, 4), r=6)
    assert layer(torch.randn(2, 8)).shape == (2, 4)


def test_rank_above_min_dim_warns_once_per_shape_class_not_per_layer(monkeypatch, recwarn):
    """The warning comes once per shape class, not per layer: 30 such layers must not print 30 copies of it."""
    monkeypatch.setattr(layer_module, "_RANK_WARNED", set())
    warnings.simplefilter("always")  # even "always" must not repeat it: the dedup is ours
    for k in range(5):
        RunLoRALinear(nn.Linear(8, 4), r=6, name=f"layers.{k}.q")
    RunLoRALinear(nn.Linear(8, 4), r=7)  # another class: warned once more
    RunLoRALinear(nn.Linear(8, 4), r=7)
    texts = [str(w.message) for w in recwarn.list if "exceeds min" in str(w.message)]
    assert len(texts) == 2, texts
    assert "layers.0.q: r=6" in texts[0] and "not warned about again" in texts[0]
    assert "r=7" in texts[1]
