"""Known third-party noise is filtered at its logger; other messages of the same logger still show.

The messages below are our own wording of each notice (holding its key words), not the third party's text: a
reworded notice must still be caught, and no test breaks because a dependency rephrased a log line.
"""

from __future__ import annotations

import logging
import subprocess
import sys

import pytest

import runlora_nb  # noqa: F401  installs the filters
from runlora_nb.common.quiet import KNOWN_NOISE

CASES = [
    ("bitsandbytes.backends.cpu.ops", "could not get gemm_4bit_forward (kernels-community): %s", False),
    ("kernels._internals.hf_hub", "no publisher TRUST check for %r, the hub is offline", False),
]


@pytest.mark.parametrize(("logger", "msg", "_"), CASES)
def test_a_known_notice_is_dropped_and_other_messages_of_its_logger_pass(caplog, logger, msg, _):
    log = logging.getLogger(logger)
    with caplog.at_level(logging.WARNING):
        log.warning(msg, "some-repo/some-kernel")
        log.warning("something else went wrong: %s", "details")
    assert [r.getMessage() for r in caplog.records] == ["something else went wrong: details"]


def test_a_once_notice_shows_its_first_record_only(caplog):
    name = next(n for n, _, once in KNOWN_NOISE if once)
    log = logging.getLogger(name)
    for f in log.filters:
        f.seen = False
    with caplog.at_level(logging.WARNING):
        for _ in range(3):
            log.warning("MatMul8bitLt: inputs are cast to float16 (ours)")
    assert len(caplog.records) == 1


def test_importing_the_package_panels_trainer_and_bitsandbytes_offline_writes_nothing_to_stderr():
    """What a first notebook cell does; any stderr there is a red block under the cell in JupyterLab."""
    code = (
        "import runlora_nb, runlora_nb.widgets, transformers; transformers.Trainer; import bitsandbytes, peft"
    )
    env = {**__import__("os").environ, "HF_HUB_OFFLINE": "1"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stderr == "", out.stderr[-3000:]
