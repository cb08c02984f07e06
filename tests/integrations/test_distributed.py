"""2-process DDP under torchrun (gloo, CPU): same training as one process, per-rank dropout masks, repeatable.

Each torchrun launch runs tests/integrations/ddp_script.py (about 20 s on 2 cores) for dropout 0 and 0.05.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file
from testutil import rel_err

pytestmark = pytest.mark.slow

SCRIPT = Path(__file__).with_name("ddp_script.py")
TIMEOUT_S = 300


def load_script():
    spec = importlib.util.spec_from_file_location("ddp_script", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def last_steps(out: Path) -> str:
    """The last step each rank finished, from its progress file."""
    lines = []
    for rank in (0, 1):
        path = out / f"progress_rank{rank}.txt"
        done = (
            path.read_text().split("\n")[-2]
            if path.exists() and path.read_text()
            else "nothing (not started)"
        )
        lines.append(f"rank {rank} last finished: {done}")
    return "; ".join(lines)


def torchrun(out: Path) -> Path:
    """Run the script on 2 ranks into ``out``; fail naming the step a slow or failed run had reached."""
    out.mkdir(parents=True)
    env = {
        k: v for k, v in os.environ.items() if k not in {"RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR"}
    }
    env.update(OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--standalone"]
    cmd += [str(SCRIPT), str(out)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=TIMEOUT_S, env=env, cwd=out)
    except subprocess.TimeoutExpired:
        pytest.fail(f"torchrun did not finish within {TIMEOUT_S} s: {last_steps(out)}")
    assert proc.returncode == 0, (
        f"torchrun failed (rc {proc.returncode}); {last_steps(out)}\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
    )
    return out


@pytest.fixture(scope="module")
def run_a(tmp_path_factory):
    return torchrun(tmp_path_factory.mktemp("ddp") / "a")


@pytest.fixture(scope="module")
def run_b(tmp_path_factory):
    return torchrun(tmp_path_factory.mktemp("ddp") / "b")


def records(out: Path, p: float) -> tuple[dict, list[str]]:
    main = json.loads((out / f"p{p}.json").read_text())
    outputs = [json.loads((out / f"p{p}_rank{r}.json").read_text())["output"] for r in (0, 1)]
    return main, outputs


def test_ddp_training_equals_one_process_on_the_global_batch(run_a, tmp_path):
    script = load_script()
    single = script.train(0.0, tmp_path)  # the whole global batch in this process
    ddp, _ = records(run_a, 0.0)
    assert len(ddp["losses"]) == script.STEPS
    for step, (got, ref) in enumerate(zip(ddp["losses"], single["losses"], strict=True)):
        assert abs(got - ref) <= 1e-6 * abs(ref), f"step {step}: DDP loss {got} vs one process {ref}"
    assert single["losses"][-1] < single["losses"][0]  # it trains: the comparison is not of untouched weights
    got, ref = load_file(run_a / "p0.0.safetensors"), load_file(tmp_path / "p0.0.safetensors")
    assert got.keys() == ref.keys() and any("lora_A" in k for k in got)
    for name in ref:
        assert rel_err(got[name], ref[name]) <= 1e-6, name


def test_ranks_draw_different_dropout_masks(run_a):
    _, at_zero = records(run_a, 0.0)
    assert at_zero[0] == at_zero[1]  # same weights, same input, no dropout: same output on both ranks
    _, at_p = records(run_a, 0.05)
    assert at_p[0] != at_p[1], "both ranks dropped the same elements (mask seed does not depend on the rank)"


def test_two_identical_2_process_runs_are_bit_identical(run_a, run_b):
    for p in (0.0, 0.05):
        assert records(run_a, p) == records(run_b, p), f"dropout {p}: runs differ"
        assert (run_a / f"p{p}.safetensors").read_bytes() == (run_b / f"p{p}.safetensors").read_bytes()
