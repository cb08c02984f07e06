"""torch.compile: the RunLoRA call is one custom op (no graph breaks), dropout works from the first call,
and compiled results equal eager ones."""

from __future__ import annotations

import pytest
import torch
from testutil import rel_err
from torch import nn

from runlora_nb.common.numerics import pair_difference_bound
from runlora_nb.core.chains import BACKWARD, FORWARD, Needs
from runlora_nb.nn.compiled import _lora_linear, lora_linear
from runlora_nb.nn.layer import RunLoRALinear

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def _layer(dropout: float, bias: bool = True, dtype=torch.float32) -> RunLoRALinear:
    torch.manual_seed(0)
    base = nn.Linear(64, 48, bias=bias).to(dtype)
    return RunLoRALinear(base, r=4, alpha=8, dropout=dropout, init_lora_weights=False)


def _run(fn, layer: RunLoRALinear, x: torch.Tensor, seed: int = 1):
    x = x.detach().clone().requires_grad_(True)
    layer.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    y = fn(x)
    (y.float() * torch.linspace(-1, 1, y.shape[-1])).sum().backward()
    return y.detach(), x.grad, layer.lora_A.weight.grad, layer.lora_B.weight.grad


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_fullgraph_layer_equals_eager_from_the_first_call(dropout):
    """fullgraph=True (any graph break would raise) with dropout on the very first compiled call; the same
    seed gives the same mask, so forward and every gradient match eager."""
    torch._dynamo.reset()
    layer = _layer(dropout).train()
    x = torch.randn(3, 10, 64)
    eager = _run(layer, layer, x)
    compiled = _run(torch.compile(layer, fullgraph=True, backend="aot_eager"), layer, x)
    bound = pair_difference_bound(torch.float32, 64)  # the same chain pair runs in both: 0 is expected
    for e, c, name in zip(eager, compiled, ("y", "dX", "dA", "dB")):
        assert c.shape == e.shape, name
        assert rel_err(c, e) <= bound, f"{name} differs from eager"
    if dropout:  # a different seed draws a different mask: the op does not bake the first mask in
        other = _run(torch.compile(layer, fullgraph=True, backend="aot_eager"), layer, x, seed=2)
        assert not torch.equal(other[2], compiled[2])


def test_inductor_compiled_layer_matches_eager_in_bf16():
    torch._dynamo.reset()
    layer = _layer(0.1, dtype=torch.bfloat16).train()
    x = torch.randn(4, 16, 64, dtype=torch.bfloat16)
    eager = _run(layer, layer, x)
    compiled = _run(torch.compile(layer, fullgraph=True), layer, x)
    for e, c, name in zip(eager, compiled, ("y", "dX", "dA", "dB")):
        assert c.dtype == e.dtype, name
        assert rel_err(c.float(), e.float()) <= pair_difference_bound(torch.bfloat16, 64), name


def test_no_graph_break_in_a_model_with_dropout():
    """A whole tiny LLaMA with adapters on every linear layer traces as one graph."""
    from runlora_nb.assets.zoo import load_model
    from runlora_nb.integrations.inject import apply_runlora
    from runlora_nb.measure.model_race import random_batch

    torch._dynamo.reset()
    model, _ = load_model("tiny-llama")
    model = apply_runlora(model, r=4, alpha=8, dropout=0.1, target_modules="all-linear").train()
    explained = torch._dynamo.explain(model)(**random_batch(model, 2, 12))
    reasons = [br.reason for br in explained.break_reasons]
    assert explained.graph_break_count == 0, reasons
    assert explained.graph_count == 1


def test_the_op_saves_only_x_and_the_seed():
    """Under the op's autograd formula backward keeps X (and an 8-byte seed), never X·A or a dropped copy."""
    layer = _layer(0.1).train()
    x = torch.randn(20, 64, requires_grad=True)
    saved: list[torch.Tensor] = []

    def pack(t):
        saved.append(t)
        return t

    params = {id(p) for p in layer.parameters()}
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = lora_linear(x, layer.lora_A.weight, layer.lora_B.weight, layer.base_layer.weight,
                        layer.base_layer.bias, chain="auto", scaling=layer.scaling, dropout=0.1, conv1d=False,
                        base_dtype=torch.float32, adapter_dtype=torch.float32, needs=Needs())  # fmt: skip
    activations = [t for t in saved if id(t) not in params]
    assert sum(t.numel() * t.element_size() for t in activations) == x.numel() * 4 + 8
    y.sum().backward()
    assert x.grad is not None and layer.lora_A.weight.grad is not None


@pytest.mark.parametrize("needs", [Needs(), Needs(False, True, True), Needs(True, False, False)])
def test_opcheck(needs):
    """torch.library.opcheck: schema, fake kernel, autograd registration and AOT dispatch agree."""
    torch.manual_seed(0)
    x = torch.randn(6, 16, requires_grad=needs.dx)
    a = torch.randn(3, 16, requires_grad=needs.da)
    b = torch.randn(8, 3, requires_grad=needs.db)
    w, bias = torch.randn(8, 16), torch.randn(8)
    args = (x, a, b, w, bias, "fwd1,bwd1", 2.0, 0.0, False, torch.float32, torch.float32, *needs)
    torch.library.opcheck(_lora_linear, args)


@pytest.mark.parametrize("fwd", sorted(FORWARD))
@pytest.mark.parametrize("bwd", sorted(BACKWARD))
def test_every_pair_through_the_op_matches_the_eager_function(fwd, bwd):
    if FORWARD[fwd].merged or BACKWARD[bwd].merged:
        dropout = 0.0
    else:
        dropout = 0.2
    layer = _layer(dropout).train()
    layer.set_chain((fwd, bwd))
    x = torch.randn(2, 9, 64)
    eager = _run(layer, layer, x)

    def via_op(inp):
        return lora_linear(inp, layer.lora_A.weight, layer.lora_B.weight, layer.base_layer.weight,
                           layer.base_layer.bias, chain=(fwd, bwd), scaling=layer.scaling, dropout=dropout,
                           conv1d=False, base_dtype=torch.float32, adapter_dtype=torch.float32, needs=Needs())  # fmt: skip

    through_op = _run(via_op, layer, x)
    for e, c, name in zip(eager, through_op, ("y", "dX", "dA", "dB")):
        assert rel_err(c, e) <= pair_difference_bound(torch.float32, 64), f"{fwd}+{bwd}: {name}"
