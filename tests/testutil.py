"""Helpers shared by the tests."""

from __future__ import annotations

import functools
import urllib.request

import torch


def rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    """‖got − ref‖ / max(‖ref‖, tiny), in float64."""
    got, ref = got.detach().double(), ref.detach().double()
    return float((got - ref).norm() / ref.norm().clamp_min(1e-30))


@functools.cache
def pypi_reachable() -> bool:
    """True when the package registry answers (tests that fetch from PyPI skip with a reason otherwise)."""
    try:
        with urllib.request.urlopen("https://pypi.org/simple/pip/", timeout=5):
            return True
    except OSError:
        return False
