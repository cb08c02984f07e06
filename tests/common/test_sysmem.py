"""The process memory readings the sweeps, the engine and the memory ledger use."""

from __future__ import annotations

import mmap

import pytest

from runlora_nb.common.sysmem import peak_rss_bytes, reset_peak_rss, rss_bytes

MIB = 2**20


def _touch_and_release(size: int) -> None:
    """Make ``size`` bytes resident and give them back: an anonymous mapping of our own, so neither the heap's
    free lists nor an allocator's cache (which a long test session fills) can serve or keep it."""
    block = mmap.mmap(-1, size)
    for offset in range(0, size, mmap.PAGESIZE):
        block[offset] = 1
    block.close()


def test_the_peak_rss_can_be_reset_to_what_runs_from_now_on():
    if not reset_peak_rss():
        pytest.skip("the peak RSS can only be reset on Linux (/proc/self/clear_refs)")
    _touch_and_release(256 * MIB)
    high = peak_rss_bytes()
    assert high >= rss_bytes() + 200 * MIB
    assert reset_peak_rss()
    after = peak_rss_bytes()
    assert after < high - 200 * MIB and after >= rss_bytes() - MIB
