"""The dropout mask: one pure function of (seed, index), fused CPU kernels equal to the torch path."""

from __future__ import annotations

import pytest
import torch

from runlora_nb.core import dropout
from runlora_nb.core.dropout import DropoutMask, draw_seed, fused_kernels_available, keep_mask

DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]


def test_fused_kernels_are_available_here():
    assert fused_kernels_available()  # numba is a dependency: CI must exercise the fast path


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(7, 5), (600, 700)], ids=["small", "two-threads"])
def test_fused_kernels_equal_the_reference_function(dtype, shape):
    mask = DropoutMask(0.25, 987654321)
    x = torch.randn(shape).to(dtype)
    keep = keep_mask(shape, mask.p, mask.seed)
    expected = torch.where(keep, x, torch.zeros((), dtype=dtype))
    got = mask.apply(x)
    assert torch.equal(got, expected) and got.dtype == dtype and got.data_ptr() != x.data_ptr()
    y = x.clone()
    assert mask.apply_(y) is y and torch.equal(y, expected)


def test_torch_fallback_gives_the_same_masks(monkeypatch):
    mask = DropoutMask(0.1, 42)
    x = torch.randn(300, 900)
    fast = mask.apply(x)
    monkeypatch.setattr(dropout, "_kernels", None)
    monkeypatch.setattr(dropout, "_kernels_failed", True)
    assert torch.equal(mask.apply(x), fast)
    y = x.clone()
    assert torch.equal(mask.apply_(y), fast)


def test_non_contiguous_input_is_read_in_row_major_order():
    mask = DropoutMask(0.5, 7)
    base = torch.randn(20, 30)
    x = base.t()  # (30, 20), non-contiguous
    assert torch.equal(mask.apply(x), mask.apply(x.contiguous()))
    with pytest.raises(ValueError, match="contiguous"):
        mask.apply_(x)


def test_statistics_of_the_mask():
    keep = keep_mask((1000, 1000), 0.1, 12345)
    frac = keep.float().mean().item()
    assert abs(frac - 0.9) < 0.002
    assert abs(DropoutMask(0.1, 1).keep_scale * 0.9 - 1) < 1e-4
    rows = keep.float().mean(1)
    assert 0.005 < rows.std().item() < 0.015  # binomial spread: rows independent
    cols = keep.float().mean(0)
    assert 0.005 < cols.std().item() < 0.015
    other = keep_mask((1000, 1000), 0.1, 12346)
    agree = (keep == other).float().mean().item()
    assert abs(agree - (0.9**2 + 0.1**2)) < 0.003  # neighbouring seeds are independent streams
    assert keep_mask((100, 100), 0.0, 3).all()
    assert abs(keep_mask((1000, 1000), 0.5, 9).float().mean().item() - 0.5) < 0.003


def test_seeds_follow_torch_manual_seed():
    torch.manual_seed(5)
    a = draw_seed()
    torch.manual_seed(5)
    assert draw_seed() == a and 0 <= a < 2**63
