"""The dropout mask: one pure function of (seed, index), fused CPU kernels equal to the torch path."""

from __future__ import annotations

import subprocess
import sys

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


@pytest.mark.parametrize("threads", [1, 3, 5])
def test_the_mask_is_the_same_whatever_the_thread_count(monkeypatch, threads):
    """The mask threads follow torch's thread count; counter-based draws make the split invisible."""
    mask = DropoutMask(0.3, 123456789)
    x = torch.randn(900, 1000)  # 900k elements: three chunks of at least _PARALLEL_MIN
    expected = torch.where(keep_mask(x.shape, mask.p, mask.seed), x, torch.zeros(()))
    monkeypatch.setattr(torch, "get_num_threads", lambda: threads)
    assert dropout._mask_threads(x.numel()) == min(threads, x.numel() // dropout._PARALLEL_MIN)
    assert torch.equal(mask.apply(x), expected)


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


@pytest.fixture
def no_rank_env(monkeypatch):
    for name in ("RANK", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def seeds_of(monkeypatch, rank: str | None, n: int = 70, env: str = "RANK") -> list[int]:
    if rank is None:
        monkeypatch.delenv(env, raising=False)
    else:
        monkeypatch.setenv(env, rank)
    torch.manual_seed(7)
    return [draw_seed() for _ in range(n)]


def test_ranks_draw_different_seeds_and_rank_0_keeps_the_plain_seed(no_rank_env):
    plain = seeds_of(no_rank_env, None)
    rank0, rank1, rank2 = (seeds_of(no_rank_env, r) for r in ("0", "1", "2"))
    assert rank0 == plain  # single-process runs and rank 0 are unchanged
    assert all(a != b for a, b in zip(rank0, rank1, strict=True))  # 70 of 70 differ (was 0 of 70)
    assert all(len({a, b, c}) == 3 for a, b, c in zip(rank0, rank1, rank2, strict=True))
    assert seeds_of(no_rank_env, "1") == rank1  # reproducible per rank
    assert all(0 <= s < 2**63 for s in rank1 + rank2)
    assert seeds_of(no_rank_env, "1", env="LOCAL_RANK") == rank1  # LOCAL_RANK when RANK is unset
    masks = [DropoutMask(0.1, s[0]).keep((300, 300)) for s in (rank0, rank1)]
    agree = (masks[0] == masks[1]).float().mean().item()
    assert abs(agree - (0.9**2 + 0.1**2)) < 0.01  # independent masks, not shifted copies


def test_initialized_process_group_rank_wins_over_the_environment(no_rank_env):
    dist = torch.distributed
    no_rank_env.setenv("RANK", "0")
    no_rank_env.setattr(dist, "is_initialized", lambda: True)
    no_rank_env.setattr(dist, "get_rank", lambda group=None: 3)
    assert dropout.distributed_rank() == 3
    torch.manual_seed(7)
    raw = int(torch.randint(0, 2**63 - 1, (1,), dtype=torch.int64).item())
    torch.manual_seed(7)
    assert draw_seed() == dropout.mix_rank(raw, 3) != raw


@pytest.mark.parametrize("bad", ["-1", "one", "1.5"])
def test_a_malformed_rank_variable_is_refused(no_rank_env, bad):
    no_rank_env.setenv("RANK", bad)
    with pytest.raises(ValueError, match=r"RANK=.*non-negative integer"):
        draw_seed()


FORK_SCRIPT = """
import os, sys, time
import torch
from runlora_nb.core import dropout
from runlora_nb.core.dropout import DropoutMask
assert dropout.fused_kernels_available()
x = torch.randn(1024, 1024)  # above the two-thread threshold: the parent starts the mask pool
mask = DropoutMask(0.1, 11)
ref = mask.apply(x)
assert dropout._pool is not None
pid = os.fork()
if pid == 0:
    ok = torch.equal(mask.apply(x), ref) and torch.equal(DropoutMask(0.1, 11).apply_(x.clone()), ref)
    os._exit(0 if ok else 1)
deadline = time.monotonic() + 120
while time.monotonic() < deadline:
    done, status = os.waitpid(pid, os.WNOHANG)
    if done:
        code = os.waitstatus_to_exitcode(status)
        print(f"child exit {code}")
        sys.exit(0 if code == 0 else 1)
    time.sleep(0.05)
os.kill(pid, 9)
print("forked child hung in a large dropout call (dead mask thread pool)")
sys.exit(3)
"""


def test_a_forked_child_can_run_large_dropout_calls(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-c", FORK_SCRIPT], capture_output=True, text=True, timeout=300, cwd=tmp_path
    )
    assert proc.returncode == 0, (
        f"fork test failed (rc {proc.returncode}): {proc.stdout}\n{proc.stderr[-2000:]}"
    )
    assert "child exit 0" in proc.stdout
