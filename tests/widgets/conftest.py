"""Fixtures for the panel tests: a loaded tiny-llama picker."""

from __future__ import annotations

import pytest


@pytest.fixture
def picker_ctl():
    """A PickerController on tiny-llama with small training shapes, loaded."""
    from runlora_nb.widgets import PickerController

    ctl = PickerController("tiny-llama", batch_size=4, seq_len=32, r=4, alpha=8)
    ctl.load()
    return ctl


@pytest.fixture
def run_dir(tmp_path):
    return tmp_path / "runs"
