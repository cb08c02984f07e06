"""Interleaved timing: every round runs every candidate once, in a seeded, per-round order."""

from __future__ import annotations

import pytest

from runlora_nb.planning.timing import Cancelled, interleaved, round_order

NAMES = [f"c{i}" for i in range(8)]


def test_round_order_is_a_permutation_that_changes_between_rounds():
    orders = [round_order(NAMES, 0, k) for k in range(6)]
    for order in orders:
        assert sorted(order) == sorted(NAMES)
    assert len({tuple(o) for o in orders}) > 1  # 8! orders: six equal rounds would mean no shuffle at all
    assert {o[0] for o in orders} != {orders[0][0]}  # not always the same candidate first


def test_round_order_is_reproducible_and_none_keeps_the_given_order():
    assert [round_order(NAMES, 3, k) for k in range(4)] == [round_order(NAMES, 3, k) for k in range(4)]
    assert [round_order(NAMES, 3, k) for k in range(4)] != [round_order(NAMES, 4, k) for k in range(4)]
    assert all(round_order(NAMES, None, k) == NAMES for k in range(4))


def test_interleaved_runs_each_candidate_once_per_round_in_the_shuffled_order():
    calls: list[str] = []
    cands = {n: (lambda n=n: calls.append(n)) for n in NAMES}
    rounds: list[int] = []
    out = interleaved(
        cands, warmup=1, reps=3, budget_s=1e9, on_round=lambda k, s: rounds.append(k), shuffle_seed=7
    )
    assert set(out) == set(NAMES) and all(len(v) == 3 for v in out.values())
    assert rounds == [0, 1, 2]
    timed = calls[len(NAMES) :]  # after the warm-up round
    for k in range(3):
        assert timed[k * len(NAMES) : (k + 1) * len(NAMES)] == round_order(NAMES, 7, k)


def test_interleaved_cancel_stops_between_calls():
    calls: list[str] = []
    cands = {n: (lambda n=n: calls.append(n)) for n in NAMES}
    with pytest.raises(Cancelled):
        interleaved(cands, warmup=0, reps=5, budget_s=1e9, cancel=lambda: len(calls) >= 3)
    assert len(calls) == 3
