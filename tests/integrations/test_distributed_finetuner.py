"""The FineTuner under torchrun (2 ranks, gloo, CPU): one recorded run, the same training as one process on the
global batch, Stop on any rank stops every rank, and the checkpoint resumes on the same number of processes.

Each launch runs tests/integrations/finetuner_ddp_script.py (about 20 s on 2 cores).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file
from testutil import rel_err

from runlora_nb.ledger import list_runs, load_run
from runlora_nb.train import FineTuneConfig, FineTuner

pytestmark = pytest.mark.slow

SCRIPT = Path(__file__).with_name("finetuner_ddp_script.py")
TIMEOUT_S = 300


def _script_cfg() -> dict:
    namespace: dict = {}
    exec(SCRIPT.read_text().split("def digest")[0], namespace)  # the script's CFG, without running it
    return namespace["CFG"]


def torchrun(runs: Path, out: Path, mode: str = "", ok: bool = True) -> subprocess.CompletedProcess:
    out.mkdir(parents=True, exist_ok=True)
    env = {
        k: v for k, v in os.environ.items() if k not in {"RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR"}
    }
    env.update(OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--standalone", str(SCRIPT),
           str(runs), str(out), *([mode] if mode else [])]  # fmt: skip
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=TIMEOUT_S, env=env, cwd=out)
    except subprocess.TimeoutExpired:
        pytest.fail(f"torchrun ({mode or 'train'}) did not finish within {TIMEOUT_S} s")
    if ok:
        assert proc.returncode == 0, (
            f"torchrun failed ({proc.returncode})\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
        )
    return proc


def _ranks(out: Path, mode: str = "") -> list[dict]:
    suffix = f"-{mode}" if mode else ""
    return [json.loads((out / f"rank{r}{suffix}.json").read_text()) for r in (0, 1)]


def _adapter(run) -> dict:
    return load_file(str(Path(run.adapter_dir) / "adapter_model.safetensors"))


def test_two_ranks_record_one_run_that_equals_one_process_on_the_global_batch(tmp_path):
    torchrun(tmp_path / "runs", tmp_path / "out")
    r0, r1 = _ranks(tmp_path / "out")
    assert r0["world"] == r1["world"] == 2
    assert r0["adapter"] == r1["adapter"]  # DDP keeps the ranks' adapters identical
    assert r0["losses"] == r1["losses"]  # every rank reports the mean over ranks
    assert r0["samples"] == 2 and r1["samples"] == 0  # before and after, generated on rank 0 only
    (run_id,) = list(list_runs(tmp_path / "runs").id)  # one run folder, not one per rank
    run = load_run(run_id, tmp_path / "runs")
    assert run.status == "finished" and list(run.steps.step) == [1, 2, 3, 4] and len(run.samples) == 2

    cfg = {**_script_cfg(), "batch_size": 4}  # one process, the whole global batch of 2 x 2 rows
    one = FineTuner(FineTuneConfig(**cfg, output_dir=str(tmp_path / "one"))).run()
    assert [s.tokens for s in one.steps] == r0["tokens"]  # the same rows, drawn in the same order
    assert r0["losses"] == pytest.approx([s.loss for s in one.steps], rel=1e-5)
    ddp, ref = _adapter(run), load_file(str(tmp_path / "one" / "adapter_model.safetensors"))
    assert ddp.keys() == ref.keys()
    assert max(rel_err(ddp[k], ref[k]) for k in ref) <= 1e-5


def test_stop_on_one_rank_stops_both_and_the_run_resumes_on_two_ranks(tmp_path):
    torchrun(tmp_path / "runs", tmp_path / "out", "stop")
    r0, r1 = _ranks(tmp_path / "out", "stop")
    assert r0["end_step"] == r1["end_step"] == 2  # rank 1 asked; rank 0 stopped with it
    (run_id,) = list(list_runs(tmp_path / "runs").id)
    assert load_run(run_id, tmp_path / "runs").status == "stopped"
    torchrun(tmp_path / "runs", tmp_path / "out", "resume")
    a0, a1 = _ranks(tmp_path / "out", "resume")
    assert a0["end_step"] == a1["end_step"] == 4 and a0["adapter"] == a1["adapter"]
    run = load_run(run_id, tmp_path / "runs")
    assert run.status == "finished" and list(run.steps.step) == [1, 2, 3, 4]
    torchrun(tmp_path / "straight", tmp_path / "out2")  # the same job, never stopped
    (straight,) = _ranks(tmp_path / "out2")[:1]
    assert a0["losses"] == pytest.approx(straight["losses"], rel=1e-6)


def test_a_rank_that_dies_ends_the_job_and_leaves_a_resumable_run(tmp_path):
    proc = torchrun(tmp_path / "runs", tmp_path / "out", "die", ok=False)
    assert proc.returncode != 0  # the launcher ends the job when a rank dies; nothing hangs
    (run_id,) = list(list_runs(tmp_path / "runs").id)
    run = load_run(run_id, tmp_path / "runs")
    assert run.status in ("interrupted", "failed")  # never left "running" by a process that is gone
    assert run.state.get("checkpoint_step", 0) >= 1 and run.checkpoint is not None
    torchrun(tmp_path / "runs", tmp_path / "out", "resume")
    run = load_run(run_id, tmp_path / "runs")
    assert run.status == "finished" and list(run.steps.step) == [1, 2, 3, 4]
