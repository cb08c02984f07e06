"""Interleaved timing (A B A B … after a warm-up) shared by the planner's ``"timed"`` mode and the benchmarks."""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Mapping

import torch

from ..core.chains import ALL, BACKWARD, FORWARD, Needs
from ..core.function import CallSpec, lora_apply

__all__ = ["Cancelled", "interleaved", "pair_step", "round_order"]


class Cancelled(Exception):
    """Raised inside a measurement loop when its cancel callback returns True."""


def _sync(device: torch.device | str) -> Callable[[], None]:
    return torch.cuda.synchronize if torch.device(device).type == "cuda" else (lambda: None)


def interleaved(
    candidates: Mapping[str, Callable[[], object]],
    *,
    warmup: int = 1,
    reps: int = 5,
    budget_s: float | None = None,
    device: torch.device | str = "cpu",
    cancel: Callable[[], bool] | None = None,
    on_round: Callable[[int, dict[str, list[float]]], None] | None = None,
    shuffle_seed: int | None = 0,
) -> dict[str, list[float]]:
    """Time each candidate ``reps`` times, interleaved round by round, after ``warmup`` untimed rounds.

    Honest by construction: nothing of ours runs while a call is timed (``on_round`` runs between rounds, so a
    chart redraw or a front-end wait lands outside every timing), and the order of the candidates is shuffled
    every round (seeded, so a race is reproducible), so no candidate always runs right after a redraw, first
    in a cold cache or last in a hot one.

    Args:
        candidates: name → zero-arg callable (one full step each).
        warmup: untimed rounds first.
        reps: timed rounds.
        budget_s: stop after the round in which the timed total exceeds this (at least one round runs).
        device: CUDA devices are synchronised around each call.
        cancel: polled between calls; returning True raises :class:`Cancelled`.
        on_round: called after each timed round with (round index, samples so far), outside the timings.
        shuffle_seed: seed of the per-round order (round ``k`` has its own seeded shuffle); ``None`` keeps
            the given order every round.

    Returns:
        name → list of seconds (one per completed round).
    """
    sync = _sync(device)
    samples: dict[str, list[float]] = {name: [] for name in candidates}
    for w in range(warmup):
        for name in round_order(list(candidates), shuffle_seed, -1 - w):
            _check(cancel)
            candidates[name]()
    sync()
    spent = 0.0
    for k in range(reps):
        for name in round_order(list(candidates), shuffle_seed, k):
            fn = candidates[name]
            _check(cancel)
            t0 = time.perf_counter()
            fn()
            sync()
            dt = time.perf_counter() - t0
            samples[name].append(dt)
            spent += dt
        if on_round is not None:
            on_round(k, samples)
        if budget_s is not None and spent >= budget_s:
            break
    return samples


def round_order(names: list[str], seed: int | None, k: int) -> list[str]:
    """The order candidates run in round ``k``: a seeded shuffle, or ``names`` as given when ``seed`` is None."""
    if seed is None:
        return list(names)
    order = list(names)
    random.Random(seed * 1_000_003 + k).shuffle(order)
    return order


def _check(cancel: Callable[[], bool] | None) -> None:
    if cancel is not None and cancel():
        raise Cancelled


def pair_step(
    pair: tuple[str, str],
    n: int,
    i: int,
    o: int,
    r: int,
    *,
    needs: Needs = ALL,
    dtype: torch.dtype = torch.float32,
    adapter_dtype: torch.dtype | None = None,
    device: torch.device | str = "cpu",
    dropout: float = 0.0,
    seed: int = 0,
) -> Callable[[], None]:
    """A closure running forward + backward of one chain pair on random tensors of the given shape.

    Returns:
        Zero-arg callable; gradients are discarded after each call.
    """
    adapter_dtype = adapter_dtype or dtype
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, i, generator=g).to(device=device, dtype=dtype).requires_grad_(needs.dx)
    w = (torch.randn(o, i, generator=g) / i**0.5).to(device=device, dtype=dtype)
    a = (
        (torch.randn(r, i, generator=g) / i**0.5)
        .to(device=device, dtype=adapter_dtype)
        .requires_grad_(needs.da)
    )
    b = (
        (torch.randn(o, r, generator=g) / r**0.5)
        .to(device=device, dtype=adapter_dtype)
        .requires_grad_(needs.db)
    )
    dy = torch.randn(n, o, generator=g).to(device=device, dtype=dtype)
    spec = CallSpec(FORWARD[pair[0]], BACKWARD[pair[1]], 2.0, dropout, False, dtype, adapter_dtype)
    backward = needs.any

    def step() -> None:
        y = lora_apply(x, a, b, w, None, spec)
        if backward:
            y.backward(dy)
            x.grad = a.grad = b.grad = None

    return step
