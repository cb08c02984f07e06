"""The chain table: FLOP formulas, GEMM lists vs real FLOP counts, validity rules."""

from __future__ import annotations

import itertools

import pytest
import torch
from testutil import rel_err
from torch.utils._python_dispatch import TorchDispatchMode

from runlora_nb.common.numerics import pair_difference_bound, rounding_bound
from runlora_nb.core.chains import ALL, BACKWARD, FORWARD, Needs, Operands, pair_flops, valid_pairs
from runlora_nb.core.dropout import DropoutMask

N, I, O, R = 48, 40, 24, 4
ALL_NEEDS = [Needs(*bits) for bits in itertools.product([False, True], repeat=3)]


def paper_table(chain_id, n, i, o, r):
    """FLOPs with all grads, from the notes / paper (section 2)."""
    return {
        "fwd1": 2 * n * i * o + 2 * n * i * r + 2 * n * r * o,
        "fwd2": 2 * n * i * o + 2 * i * r * o,
        "fwd3": 2 * n * i * o + 2 * n * i * r + 2 * n * r * o,  # fwd1's products, in the base dtype
        "bwd1": 2 * n * i * o + 6 * n * i * r + 4 * n * r * o,
        "bwd2": 4 * n * i * o + 4 * n * i * r + 2 * n * r * o + 2 * i * r * o,
        "bwd3": 4 * n * i * o + 2 * n * i * r + 2 * n * r * o + 4 * i * r * o,
        "bwd4": 4 * n * i * o + 6 * i * r * o,
        "bwd5": 2 * n * i * o + 4 * n * i * r + 4 * n * r * o + 2 * i * r * o,
        "bwd6": 2 * n * i * o
        + 6 * n * i * r
        + 4 * n * r * o,  # bwd1's products, dX's adapter term in the base dtype
    }[chain_id]


@pytest.mark.parametrize("cid", [*FORWARD, *BACKWARD])
@pytest.mark.parametrize("shape", [(2048, 1024, 1024, 16), (7, 3, 5, 2), (512, 4096, 4096, 8)])
def test_flops_match_paper_table(cid, shape):
    chain = FORWARD.get(cid) or BACKWARD[cid]
    assert chain.flops(*shape, ALL) == paper_table(cid, *shape)


class GemmCounter(TorchDispatchMode):
    """Records every mm / addmm / addmm_ that really runs as (m, k, n, first operand transposed)."""

    def __init__(self):
        super().__init__()
        self.gemms: list[tuple[int, int, int, bool]] = []

    @property
    def flops(self) -> int:
        return sum(2 * m * k * n for m, k, n, _ in self.gemms)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name in ("mm", "addmm", "addmm_"):
            a, b = (args[0], args[1]) if name == "mm" else (args[1], args[2])
            trans = not a.is_contiguous() and a.stride(0) == 1
            self.gemms.append((a.shape[0], a.shape[1], b.shape[1], trans))
        elif name in ("bmm", "baddbmm", "matmul", "linear"):
            raise AssertionError(f"unexpected product op {name}")
        return func(*args, **(kwargs or {}))


def _listed(chain, needs=ALL) -> list[tuple[int, int, int, bool]]:
    return sorted((g.m, g.k, g.n, g.trans_a) for g in chain.gemms(N, I, O, R, needs))


def _operands(mask=None, dtype=torch.float64):
    g = torch.Generator().manual_seed(1)
    return Operands(
        x=torch.randn(N, I, generator=g, dtype=dtype),
        weight=torch.randn(O, I, generator=g, dtype=dtype),
        a=torch.randn(R, I, generator=g, dtype=dtype),
        b=torch.randn(O, R, generator=g, dtype=dtype),
        s=0.5,
        mask=mask,
    )


@pytest.mark.parametrize("cid", list(FORWARD))
def test_forward_gemm_list_matches_counted_flops(cid):
    with GemmCounter() as counter:
        FORWARD[cid].fn(_operands())
    assert counter.flops == FORWARD[cid].flops(N, I, O, R)
    assert sorted(counter.gemms) == _listed(FORWARD[cid])


@pytest.mark.parametrize("cid", list(BACKWARD))
@pytest.mark.parametrize("needs", ALL_NEEDS, ids=lambda n: n.label())
def test_backward_gemm_list_matches_counted_flops(cid, needs):
    dy = torch.randn(N, O, dtype=torch.float64)
    with GemmCounter() as counter:
        dx, da, db = BACKWARD[cid].fn(_operands(), dy, needs)
    assert counter.flops == BACKWARD[cid].flops(N, I, O, R, needs)
    assert sorted(counter.gemms) == _listed(BACKWARD[cid], needs)
    assert (dx is not None, da is not None, db is not None) == tuple(needs)


def test_skipping_gradients_changes_flops_and_the_best_chain():
    n, i, o, r = 4096, 1024, 1024, 16
    full = {b: BACKWARD[b].flops(n, i, o, r, ALL) for b in BACKWARD}
    no_dx = {b: BACKWARD[b].flops(n, i, o, r, Needs(False, True, True)) for b in BACKWARD}
    assert all(no_dx[b] < full[b] for b in BACKWARD)
    # without dX the merged backward chains cost the same as their unmerged twins
    assert no_dx["bwd4"] == no_dx["bwd3"] and no_dx["bwd5"] == no_dx["bwd1"]
    # frozen adapters (only dX): only the dX terms remain
    only_dx = BACKWARD["bwd1"].flops(n, i, o, r, Needs(True, False, False))
    assert only_dx == 2 * n * o * i + 2 * n * o * r + 2 * n * r * i


def test_regimes_from_the_paper():
    i, o, r = 1024, 1024, 16
    threshold = i * o // (i + o)  # fwd2 beats fwd1 when N > io/(i+o)
    for n, expect in [(threshold // 2, "fwd1"), (threshold * 2, "fwd2")]:
        best = min(FORWARD, key=lambda f: FORWARD[f].flops(n, i, o, r))
        assert best == expect
    # bwd5 beats bwd1 when N > o (bwd5: one merged dX product instead of two adapter ones)
    assert BACKWARD["bwd5"].flops(4 * o, i, o, r) < BACKWARD["bwd1"].flops(4 * o, i, o, r)
    assert BACKWARD["bwd5"].flops(o // 4, i, o, r) > BACKWARD["bwd1"].flops(o // 4, i, o, r)


def test_valid_pairs_exclude_merged_chains_with_dropout():
    everything = list(valid_pairs(0.0))
    assert len(everything) == 10 and not any(FORWARD[f].mixed_only for f, _ in everything)
    with_dropout = list(valid_pairs(0.1))
    assert with_dropout == [("fwd1", "bwd1"), ("fwd1", "bwd2"), ("fwd1", "bwd3")]
    assert list(valid_pairs(0.0, allow_merged=False)) == with_dropout
    mixed = list(valid_pairs(0.1, allow_merged=False, mixed=True))
    assert mixed == [
        *with_dropout,
        ("fwd1", "bwd6"),
        ("fwd3", "bwd1"),
        ("fwd3", "bwd2"),
        ("fwd3", "bwd3"),
        ("fwd3", "bwd6"),
    ]
    for f, b in with_dropout:
        assert FORWARD[f].valid_with_dropout() and BACKWARD[b].valid_with_dropout()
    assert not FORWARD["fwd2"].valid_with_dropout()


def test_chain_records_are_descriptive():
    assert FORWARD["fwd2"].formula == "Y = X(W + sAB)"
    assert FORWARD["fwd2"].fn.__doc__.startswith("Y = X(W + sAB)")
    assert FORWARD["fwd1"].temp_bytes(N, I, O, R, ALL, 4) == N * R * 4
    assert FORWARD["fwd2"].temp_bytes(N, I, O, R, ALL, 2) == I * O * 2
    assert BACKWARD["bwd4"].temp_bytes(N, I, O, R, ALL, 4) == 2 * I * O * 4
    assert BACKWARD["bwd4"].temp_bytes(N, I, O, R, Needs(False, True, True), 4) == I * O * 4
    assert pair_flops("fwd1", "bwd1", N, I, O, R, Needs(False, False, False)) == FORWARD["fwd1"].flops(
        N, I, O, R
    )
    assert "fwd2" in repr(FORWARD["fwd2"])


def test_dropout_chains_use_the_mask_everywhere_on_the_adapter_path():
    mask = DropoutMask(0.3, 12345)
    keep = mask.keep((N, I))
    assert 0.6 < keep.float().mean() < 0.8
    op_masked = _operands(mask)
    op_ref = _operands()
    op_ref.x = op_ref.x * keep  # the adapter sees D(X), the base sees X
    dy = torch.randn(N, O, dtype=torch.float64)
    y = FORWARD["fwd1"].fn(op_masked)
    base = op_masked.x @ op_masked.wt.t()
    adapter = (op_ref.x @ op_ref.a.t()) @ op_ref.b.t() * op_ref.s
    torch.testing.assert_close(y, base + adapter)
    for cid in ("bwd1", "bwd2", "bwd3"):
        dx, da, db = BACKWARD[cid].fn(_operands(mask), dy, ALL)
        _, da_ref, db_ref = BACKWARD["bwd1"].fn(op_ref, dy, ALL)
        torch.testing.assert_close(da, da_ref)
        torch.testing.assert_close(db, db_ref)
        t = dy @ op_ref.b * op_ref.s
        torch.testing.assert_close(dx, dy @ op_ref.wt + (t @ op_ref.a) * keep)


def _mixed_operands(mask=None):
    """A bf16 base (X, W) with fp32 adapters (A, B): the setting fwd3 is for."""
    op = _operands(mask)
    op.x, op.weight = op.x.to(torch.bfloat16), op.weight.to(torch.bfloat16)
    op.a, op.b = op.a.float(), op.b.float()
    return op


def _mixed_reference(op, keep=None) -> torch.Tensor:
    """(N, o) float64 Y of the same (already rounded) inputs."""
    x, w, a, b = (t.double() for t in (op.x, op.weight, op.a, op.b))
    xd = x if keep is None else x * keep
    return x @ w.t() + op.s * (xd @ a.t()) @ b.t()


@pytest.mark.parametrize("p", [0.0, 0.3])
def test_fwd3_meets_the_bf16_bound_like_fwd1(p):
    """fwd3 rounds A, B and XA to bf16; Y still meets the bf16 rounding bound against float64, and stays
    within the pair-vs-pair bound of fwd1 (which adds the adapter term in fp32)."""
    mask = DropoutMask(p, 7) if p else None
    keep = mask.keep((N, I)) if mask else None
    ref = _mixed_reference(_mixed_operands(mask), keep)
    y3 = FORWARD["fwd3"].fn(_mixed_operands(mask))
    y1 = FORWARD["fwd1"].fn(_mixed_operands(mask))
    assert y3.dtype == torch.bfloat16
    k = max(N, I, O, R)
    assert rel_err(y3, ref) <= rounding_bound(torch.bfloat16, k, 3)
    assert rel_err(y3, y1) <= pair_difference_bound(torch.bfloat16, k)


def test_fwd3_with_equal_dtypes_is_fwd1():
    mask = DropoutMask(0.3, 12345)
    torch.testing.assert_close(FORWARD["fwd3"].fn(_operands(mask)), FORWARD["fwd1"].fn(_operands(mask)))
    torch.testing.assert_close(FORWARD["fwd3"].fn(_operands()), FORWARD["fwd1"].fn(_operands()))


@pytest.mark.parametrize("p", [0.0, 0.3])
def test_bwd6_meets_the_bf16_bound_and_keeps_fp32_adapter_grads(p):
    """bwd6's dX meets the bf16 bound against float64 and the pair bound of bwd1; dA and dB are bwd1's."""
    mask = DropoutMask(p, 7) if p else None
    g = torch.Generator().manual_seed(3)
    dy = torch.randn(N, O, generator=g).to(torch.bfloat16)
    dx6, da6, db6 = BACKWARD["bwd6"].fn(_mixed_operands(mask), dy, ALL)
    dx1, da1, db1 = BACKWARD["bwd1"].fn(_mixed_operands(mask), dy, ALL)
    op = _mixed_operands()
    keep = mask.keep((N, I)) if mask else torch.ones(N, I, dtype=torch.bool)
    w, a, b, d = op.weight.double(), op.a.double(), op.b.double(), dy.double()
    ref = d @ w + op.s * ((d @ b) @ a) * keep
    k = max(N, I, O, R)
    assert dx6.dtype == torch.bfloat16
    assert rel_err(dx6, ref) <= rounding_bound(torch.bfloat16, k, 3)
    assert rel_err(dx6, dx1) <= pair_difference_bound(torch.bfloat16, k)
    torch.testing.assert_close(da6, da1, rtol=0, atol=0)
    torch.testing.assert_close(db6, db1, rtol=0, atol=0)
