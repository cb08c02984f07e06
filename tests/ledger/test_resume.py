"""Checkpoint and resume (kill -9 mid-run, then resume = uninterrupted), divergence, the ln(vocab) warning."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from runlora_nb.app.cli import main
from runlora_nb.ledger import load_run, recorded_tuner, resume_tuner
from runlora_nb.train import FineTuneConfig, FineTuner
from runlora_nb.train.checkpoint import load_checkpoint

# dropout 0, fp32, a pinned planner mode (same chain pair in every process), grad_accum 2 (data position matters)
CFG = {"model": "tiny-llama", "lr": 3e-3, "seq_len": 32, "batch_size": 4, "grad_accum": 2, "eval_batches": 1,
       "sample_tokens": 4, "dropout": 0.0, "dtype": "fp32", "chain": "flops", "steps": 10, "eval_interval": 4,
       "checkpoint_every": 3, "warmup_steps": 2}  # fmt: skip

KILLED_RUN = textwrap.dedent(
    """
    import os, signal, sys
    from runlora_nb.ledger import recorded_tuner
    from runlora_nb.train import Callback, FineTuneConfig

    class KillAt(Callback):
        def on_start(self, event):
            self.run_id = event.run_id

        def on_step(self, event):
            if event.step == 8:  # after the step-6 checkpoint, before the end: the process dies mid-run
                print(self.run_id, flush=True)
                os.kill(os.getpid(), signal.SIGKILL)

    cfg = FineTuneConfig(**{cfg}, runs_dir=sys.argv[1])
    recorded_tuner(cfg, [KillAt()]).run()
    """
)


class _StopAt:
    def __init__(self, step, stop):
        self.step, self.stop = step, stop

    def on_step(self, event):
        if event.step == self.step:
            self.stop()


def _adapter(folder) -> dict[str, torch.Tensor]:
    return load_file(str(Path(folder) / "adapter_model.safetensors"))


@pytest.mark.slow
def test_kill9_mid_run_then_resume_equals_an_uninterrupted_run(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())}  # same threads: same reductions
    script = KILLED_RUN.replace("{cfg}", repr(CFG))
    proc = subprocess.run(
        [sys.executable, "-c", script, str(tmp_path / "runs")],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    run_id = Path(proc.stdout.strip().splitlines()[-1]).name
    killed = load_run(run_id, tmp_path / "runs")
    assert (
        killed.status == "interrupted" and killed.steps.step.max() == 7
    )  # the killer runs before the ledger
    assert load_checkpoint(killed.path).step == 6 and killed.adapter_dir is None

    assert main(["train", "--resume", run_id, "--runs-dir", str(tmp_path / "runs")]) == 0
    resumed = load_run(run_id, tmp_path / "runs")
    assert resumed.status == "finished" and list(resumed.steps.step) == list(range(1, 11))  # 7, 8 re-run once
    assert list(resumed.evals.step) == [0, 4, 8, 10]

    straight = FineTuner(FineTuneConfig(**CFG, runs_dir=str(tmp_path / "runs"))).run()
    a, b = _adapter(resumed.adapter_dir), _adapter(straight.end.adapter_dir)
    assert a.keys() == b.keys()
    for name in a:  # bit-identical: same RNG, data order, optimizer moments and reduction order
        assert torch.equal(a[name], b[name]), name
    losses = [s.loss for s in straight.steps]
    assert list(resumed.steps.train_loss) == pytest.approx(losses, rel=0, abs=0)


def test_stop_checkpoints_and_resume_finishes(tmp_path):
    cfg = FineTuneConfig(**{**CFG, "checkpoint_every": 0}, runs_dir=str(tmp_path))

    tuner = recorded_tuner(cfg)
    tuner.add_callback(_StopAt(3, tuner.stop))
    tuner.run()
    assert load_run(tuner.run_dir).status == "stopped" and load_checkpoint(tuner.run_dir).step == 3
    again = resume_tuner(tuner.run_dir.name, runs_dir=str(tmp_path)).run()
    assert again.end.step == 10 and load_run(tuner.run_dir).status == "finished"
    assert [s.step for s in again.steps] == list(range(1, 11))


def test_resume_errors_are_clear(tmp_path):
    with pytest.raises(ValueError, match="checkpoint_every must be >= 0"):
        FineTuner(FineTuneConfig(**{**CFG, "checkpoint_every": -1}))
    with pytest.raises(ValueError, match="no run 'nope'"):
        resume_tuner("nope", runs_dir=str(tmp_path))
    cfg = FineTuneConfig(**{**CFG, "steps": 2, "checkpoint_every": 0}, runs_dir=str(tmp_path))
    tuner = recorded_tuner(cfg)
    tuner.run()
    with pytest.raises(ValueError, match="has no checkpoint"):
        resume_tuner(tuner.run_dir.name, runs_dir=str(tmp_path))


def test_nan_loss_ends_the_run_diverged_without_saving_the_adapter(tmp_path):
    """A diverging run (lr=1e30: NaN from step 2) must not end "done" and save a non-finite adapter."""
    out = tmp_path / "adapter"
    cfg = FineTuneConfig(**{**CFG, "lr": 1e30, "checkpoint_every": 1, "warmup_steps": 0, "grad_accum": 1},
                         runs_dir=str(tmp_path / "runs"), output_dir=str(out))  # fmt: skip
    with pytest.warns(RuntimeWarning, match="diverged at step"):
        res = recorded_tuner(cfg).run()
    end = res.end
    assert end.diverged and end.adapter_dir is None and end.step < cfg.steps
    assert f"diverged at step {end.step + 1}" in end.error and "lower the learning rate" in end.error
    assert not out.exists()  # the non-finite adapter was not written
    run = load_run(Path(cfg.runs_dir).iterdir().__next__())
    assert run.status == "diverged" and run.state["message"] == end.error
    state = load_checkpoint(run.path)  # the last good checkpoint stays, and it is finite
    assert state.step == end.step and all(torch.isfinite(t).all() for t in state.adapter.values())
    assert f"last good checkpoint (step {end.step})" in end.error
    with pytest.warns(RuntimeWarning, match="diverged"):  # the CLI exits with status 3
        assert main(["train", "--lr", "1e30", "--steps", "3", "--seq", "32", "--batch", "4", "--no-samples",
                     "--runs-dir", str(tmp_path / "cli")]) == 3  # fmt: skip


def test_a_learning_run_does_not_warn(tmp_path):
    res = recorded_tuner(FineTuneConfig(**{**CFG, "steps": 4}, runs_dir=str(tmp_path))).run()
    assert res.warnings == [] and load_run(next(tmp_path.iterdir())).state["warnings"] == []


def test_a_run_whose_logits_stay_uniform_warns_end_to_end(tmp_path):
    """A loss sitting at ln(vocab) (here: a zeroed, frozen output head) learns nothing, so it gets a warning."""
    from runlora_nb.assets.zoo import load_model

    model, tok = load_model("tiny-llama")
    with torch.no_grad():
        model.get_output_embeddings().weight.zero_()  # every logit 0: the loss is exactly ln(vocab)
    cfg = FineTuneConfig(**{**CFG, "steps": 4, "eval_interval": 0, "checkpoint_every": 0}, runs_dir=str(tmp_path),
                         sample_prompts=())  # fmt: skip
    with pytest.warns(RuntimeWarning, match="ln\\(vocab\\)"):
        res = recorded_tuner(cfg, model=(model, tok)).run()
    assert len(res.warnings) == 1 and "steps 1-4" in res.warnings[0]
    assert load_run(next(tmp_path.iterdir())).state["warnings"] == res.warnings


def _checkpointed_run(root) -> Path:
    """A finished two-step run with a checkpoint at step 1 (resumable)."""
    cfg = FineTuneConfig(**{**CFG, "steps": 2, "checkpoint_every": 1, "eval_interval": 0}, runs_dir=str(root))
    tuner = recorded_tuner(cfg)
    tuner.run()
    return tuner.run_dir


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_resume_of_a_run_that_is_still_running_is_refused(tmp_path, capsys):
    """Two processes wrote one run folder: `train --resume ID` was accepted while ID was training."""
    folder = _checkpointed_run(tmp_path)
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        status = json.loads((folder / "status.json").read_text())
        status.update(status="running", pid=live.pid)
        (folder / "status.json").write_text(json.dumps(status))
        before = _snapshot(folder)
        assert main(["train", "--resume", folder.name, "--runs-dir", str(tmp_path)]) == 2
        err = capsys.readouterr().err
        assert "still running" in err and str(live.pid) in err
        with pytest.raises(ValueError, match="still running"):
            resume_tuner(folder, config=FineTuneConfig(**CFG, runs_dir=str(tmp_path)))
        assert _snapshot(folder) == before  # nothing read into a trainer, nothing written
    finally:
        live.kill()
        live.wait()


@pytest.mark.parametrize("damage", ['{"id": "x", "conf', "", '{"config": {}}'])
def test_resume_with_a_damaged_config_is_refused_before_writing(tmp_path, capsys, damage):
    """A damaged config.json fell back to the defaults, then the run's record was rewritten and failed."""
    folder = _checkpointed_run(tmp_path)
    (folder / "config.json").write_text(damage)
    before = _snapshot(folder)
    assert main(["train", "--resume", folder.name, "--runs-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert f"{folder / 'config.json'} is damaged" in err and "model='tiny-llama'" in err
    with pytest.raises(ValueError, match="resume with the run's config given explicitly"):
        resume_tuner(folder, runs_dir=str(tmp_path))
    assert _snapshot(folder) == before


def test_resume_with_another_config_is_refused_before_writing(tmp_path):
    folder = _checkpointed_run(tmp_path)
    before = _snapshot(folder)
    with pytest.raises(ValueError, match=r"another config lr=0\.003"):
        resume_tuner(folder, config=FineTuneConfig(**{**CFG, "steps": 2, "lr": 1e-3}, runs_dir=str(tmp_path)))
    assert _snapshot(folder) == before


def test_elapsed_continues_from_the_time_already_spent_on_resume(tmp_path):
    """elapsed_s restarted from zero on resume."""
    cfg = FineTuneConfig(**{**CFG, "checkpoint_every": 0, "eval_interval": 0}, runs_dir=str(tmp_path))

    class Slow:
        def on_step(self, event):
            if event.step == 2:
                time.sleep(2.0)  # the first session spends at least 2 s

    tuner = recorded_tuner(cfg, [Slow()])
    tuner.add_callback(_StopAt(3, tuner.stop))
    first = tuner.run()
    spent = first.steps[-1].elapsed_s
    assert first.end.step == 3 and spent >= 2.0
    again = resume_tuner(tuner.run_dir.name, runs_dir=str(tmp_path)).run()
    resumed = [s.elapsed_s for s in again.steps if s.step > 3]
    assert resumed and min(resumed) > spent and again.end.elapsed_s > spent
    run = load_run(tuner.run_dir)
    assert run.steps.elapsed_s.is_monotonic_increasing and run.state["elapsed_s"] > spent
