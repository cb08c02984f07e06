"""Helpers for the panel tests (imported by name: tests/widgets is on sys.path)."""

from __future__ import annotations

import time

import ipywidgets as widgets

SMALL_LAYER = {"tokens": 64, "in_features": 32, "out_features": 64, "rank": 4, "reps": 2, "warmup": 0}


def all_widgets(root: widgets.Widget) -> list[widgets.Widget]:
    """``root`` and every widget below it through ``children``."""
    out = [root]
    for child in getattr(root, "children", ()):
        out += all_widgets(child)
    return out


def wait_until(predicate, timeout: float = 30.0, poll: float = 0.01) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(poll)
    return bool(predicate())
