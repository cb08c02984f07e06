"""Known third-party noise is filtered at its logger; other messages of the same logger still show."""

from __future__ import annotations

import logging
import subprocess
import sys

import runlora_nb  # noqa: F401  installs the filters

NOISY = "bitsandbytes.backends.cpu.ops"


def test_the_known_bitsandbytes_message_is_dropped_and_others_pass(caplog):
    log = logging.getLogger(NOISY)
    with caplog.at_level(logging.WARNING):
        log.warning("Failed to load CPU gemm_4bit_forward from kernels-community: %s. Please …", "No module")
        log.warning("something else went wrong")
    assert [r.getMessage() for r in caplog.records] == ["something else went wrong"]


def test_importing_the_panels_and_the_trainer_prints_no_bitsandbytes_noise():
    code = "import runlora_nb.widgets, transformers; transformers.Trainer; import bitsandbytes"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "gemm_4bit_forward" not in out.stderr + out.stdout
