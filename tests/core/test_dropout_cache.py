"""Fused dropout kernels with a read-only cache still build, and the warning names the right remedy."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from runlora_nb.core import dropout

PROBE = """
import warnings
warnings.simplefilter("always")
with warnings.catch_warnings(record=True) as caught:
    from runlora_nb.core.dropout import fused_kernels_available
    ok = fused_kernels_available()
print("available" if ok else "unavailable")
for w in caught:
    print("WARNING", w.message)
"""


def test_an_unwritable_cache_still_gives_the_fused_kernels(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")  # nothing can be created below it, even by root
    env = {k: v for k, v in os.environ.items() if k != "NUMBA_CACHE_DIR"}
    env["RUNLORA_NB_CACHE"] = str(blocker / "cache")
    out = subprocess.run(
        [sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, timeout=300, check=True
    ).stdout
    assert out.startswith("available"), out
    assert "pip install numba" not in out


def test_the_warning_names_the_right_remedy(monkeypatch):
    err = PermissionError("[Errno 13] Permission denied: '/cache/numba'")
    installed = dropout._unavailable_message(err)
    assert "pip install numba" not in installed and "numba is installed" in installed
    assert "NUMBA_CACHE_DIR" in installed and "RUNLORA_NB_CACHE" in installed
    monkeypatch.setattr(dropout.importlib.util, "find_spec", lambda name: None)
    assert "`pip install numba` restores them" in dropout._unavailable_message(
        ImportError("No module named numba")
    )


def test_a_broken_compile_with_numba_installed_does_not_suggest_installing_it(monkeypatch):
    def broken():
        raise RuntimeError("cannot cache function 'masked_copy': no locator available")

    monkeypatch.setattr(dropout, "_kernels", None)
    monkeypatch.setattr(dropout, "_kernels_failed", False)
    monkeypatch.setattr(dropout, "_compile", broken)
    with pytest.warns(RuntimeWarning, match="numba is installed") as record:
        assert not dropout.fused_kernels_available()
    assert all("pip install numba" not in str(w.message) for w in record)
