"""The process memory readings the sweeps, the engine and the memory ledger use."""

from __future__ import annotations

import pytest
import torch

from runlora_nb.common.sysmem import peak_rss_bytes, reset_peak_rss, rss_bytes


def test_the_peak_rss_can_be_reset_to_what_runs_from_now_on():
    if not reset_peak_rss():
        pytest.skip("the peak RSS can only be reset on Linux (/proc/self/clear_refs)")
    block = torch.ones(256 * 2**20 // 4)  # 256 MiB, touched
    high = peak_rss_bytes()
    del block
    assert high >= rss_bytes() + 200 * 2**20
    assert reset_peak_rss()
    after = peak_rss_bytes()
    assert after < high - 200 * 2**20 and after >= rss_bytes() - 2**20
