"""Checkpoint and resume (kill -9 mid-run, then resume = uninterrupted), divergence, the ln(vocab) warning."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

from runlora_nb.app.cli import main
from runlora_nb.tuning import FineTuneConfig, FineTuner
from runlora_nb.tuning.checkpoint import load_checkpoint
from runlora_nb.tuning.guards import UniformLossGuard
from runlora_nb.tuning.runs import load_run

# dropout 0, fp32, a pinned planner mode (same chain pair in every process), grad_accum 2 (data position matters)
CFG = {"model": "tiny-llama", "lr": 3e-3, "seq_len": 32, "batch_size": 4, "grad_accum": 2, "eval_batches": 1,
       "sample_tokens": 4, "dropout": 0.0, "dtype": "fp32", "chain": "flops", "steps": 10, "eval_interval": 4,
       "checkpoint_every": 3, "warmup_steps": 2}  # fmt: skip

KILLED_RUN = textwrap.dedent(
    """
    import os, signal, sys
    from runlora_nb.tuning import Callback, FineTuneConfig, FineTuner

    class KillAt(Callback):
        def on_step(self, trainer, event):
            if event.step == 8:  # after the step-6 checkpoint, before the end: the process dies mid-run
                print(trainer.run_dir, flush=True)
                os.kill(os.getpid(), signal.SIGKILL)

    cfg = FineTuneConfig(**{cfg}, runs_dir=sys.argv[1])
    FineTuner(cfg, [KillAt()]).run()
    """
)


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
    assert load_checkpoint(killed.path)["step"] == 6 and killed.adapter_dir is None

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

    class StopAt:
        def on_step(self, trainer, event):
            if event.step == 3:
                trainer.stop()

    tuner = FineTuner(cfg, [StopAt()])
    tuner.run()
    assert load_run(tuner.run_dir).status == "stopped" and load_checkpoint(tuner.run_dir)["step"] == 3
    again = FineTuner.resume(tuner.run_dir.name, runs_dir=str(tmp_path)).run()
    assert again.end.step == 10 and load_run(tuner.run_dir).status == "finished"
    assert [s.step for s in again.steps] == list(range(1, 11))


def test_resume_errors_are_clear(tmp_path):
    with pytest.raises(ValueError, match="no run 'nope'"):
        FineTuner(FineTuneConfig(**CFG), resume="nope")
    cfg = FineTuneConfig(**{**CFG, "steps": 2, "checkpoint_every": 0}, runs_dir=str(tmp_path))
    tuner = FineTuner(cfg)
    tuner.run()
    with pytest.raises(ValueError, match="has no checkpoint"):
        FineTuner.resume(tuner.run_dir.name, runs_dir=str(tmp_path))
    with pytest.raises(ValueError, match="checkpoint_every must be >= 0"):
        FineTuner(FineTuneConfig(**{**CFG, "checkpoint_every": -1}))


def test_nan_loss_ends_the_run_diverged_without_saving_the_adapter(tmp_path):
    """Defect 14.3: lr=1e30 gave NaN from step 2, the run ended "done" and saved a non-finite adapter."""
    out = tmp_path / "adapter"
    cfg = FineTuneConfig(**{**CFG, "lr": 1e30, "checkpoint_every": 1, "warmup_steps": 0, "grad_accum": 1},
                         runs_dir=str(tmp_path / "runs"), output_dir=str(out))  # fmt: skip
    with pytest.warns(RuntimeWarning, match="diverged at step"):
        res = FineTuner(cfg).run()
    end = res.end
    assert end.diverged and end.adapter_dir is None and end.step < cfg.steps
    assert f"diverged at step {end.step + 1}" in end.error and "lower the learning rate" in end.error
    assert not out.exists()  # the non-finite adapter was not written
    run = load_run(Path(cfg.runs_dir).iterdir().__next__())
    assert run.status == "diverged" and run.state["message"] == end.error
    state = load_checkpoint(run.path)  # the last good checkpoint stays, and it is finite
    assert state["step"] == end.step and all(torch.isfinite(t).all() for t in state["adapter"].values())
    assert f"last good checkpoint (step {end.step})" in end.error
    with pytest.warns(RuntimeWarning, match="diverged"):  # the CLI exits with status 3
        assert main(["train", "--lr", "1e30", "--steps", "3", "--seq", "32", "--batch", "4", "--no-samples",
                     "--runs-dir", str(tmp_path / "cli")]) == 3  # fmt: skip


def _fake_trainer(eval_interval: int, steps: int, vocab: int):
    model = torch.nn.Module()
    model.get_output_embeddings = lambda: torch.nn.Linear(4, vocab, bias=False)
    cfg = FineTuneConfig(model="tiny-llama", eval_interval=eval_interval, steps=steps)
    return SimpleNamespace(model=model, label_names=(), config=cfg, history=SimpleNamespace(warnings=[])), cfg


@pytest.mark.parametrize(("offset", "warns"), [(0.005, True), (0.02, False)])
def test_loss_stuck_at_ln_vocab_for_the_first_eval_window_warns(offset, warns):
    trainer, cfg = _fake_trainer(eval_interval=5, steps=20, vocab=1000)
    guard, ln_v = UniformLossGuard(), math.log(1000)
    guard.on_start(trainer, SimpleNamespace(config=cfg))
    with pytest.warns(RuntimeWarning, match="ln\\(vocab\\)") if warns else _no_warning():
        for step in range(1, 8):  # one step out of the band (step 3 with offset 2%) clears the warning
            loss = ln_v * (1 + (offset if step == 3 else 0.001))
            guard.on_step(trainer, SimpleNamespace(step=step, loss=loss))
    assert bool(trainer.history.warnings) == warns
    if warns:
        assert "steps 1-5" in trainer.history.warnings[0] and "lr=" in trainer.history.warnings[0]


def test_a_learning_run_does_not_warn(tmp_path):
    res = FineTuner(FineTuneConfig(**{**CFG, "steps": 4}, runs_dir=str(tmp_path))).run()
    assert res.warnings == [] and load_run(next(tmp_path.iterdir())).state["warnings"] == []


class _no_warning:
    def __enter__(self):
        import warnings

        self._ctx = warnings.catch_warnings()
        self._ctx.__enter__()
        warnings.simplefilter("error", RuntimeWarning)

    def __exit__(self, *exc):
        self._ctx.__exit__(*exc)


def test_a_run_whose_logits_stay_uniform_warns_end_to_end(tmp_path):
    """Defect 14.3's second half: a loss sitting at ln(vocab) (here: a zeroed, frozen output head) got no warning."""
    from runlora_nb.assets.zoo import load_model

    model, tok = load_model("tiny-llama")
    with torch.no_grad():
        model.get_output_embeddings().weight.zero_()  # every logit 0: the loss is exactly ln(vocab)
    cfg = FineTuneConfig(**{**CFG, "steps": 4, "eval_interval": 0, "checkpoint_every": 0}, runs_dir=str(tmp_path),
                         sample_prompts=())  # fmt: skip
    with pytest.warns(RuntimeWarning, match="ln\\(vocab\\)"):
        res = FineTuner(cfg, model=(model, tok)).run()
    assert len(res.warnings) == 1 and "steps 1-4" in res.warnings[0]
    assert load_run(next(tmp_path.iterdir())).state["warnings"] == res.warnings


def _checkpointed_run(root) -> Path:
    """A finished two-step run with a checkpoint at step 1 (resumable)."""
    cfg = FineTuneConfig(**{**CFG, "steps": 2, "checkpoint_every": 1, "eval_interval": 0}, runs_dir=str(root))
    tuner = FineTuner(cfg)
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
            FineTuner(FineTuneConfig(**CFG, runs_dir=str(tmp_path)), resume=folder)
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
        FineTuner.resume(folder, runs_dir=str(tmp_path))
    assert _snapshot(folder) == before


def test_resume_with_another_config_is_refused_before_writing(tmp_path):
    folder = _checkpointed_run(tmp_path)
    before = _snapshot(folder)
    with pytest.raises(ValueError, match=r"another config lr=0\.003"):
        FineTuner(FineTuneConfig(**{**CFG, "steps": 2, "lr": 1e-3}, runs_dir=str(tmp_path)), resume=folder)
    assert _snapshot(folder) == before


def test_elapsed_continues_from_the_time_already_spent_on_resume(tmp_path):
    """elapsed_s restarted from zero on resume."""
    cfg = FineTuneConfig(**{**CFG, "checkpoint_every": 0, "eval_interval": 0}, runs_dir=str(tmp_path))

    class SlowThenStop:
        def on_step(self, trainer, event):
            if event.step == 2:
                time.sleep(2.0)  # the first session spends at least 2 s
            if event.step == 3:
                trainer.stop()

    tuner = FineTuner(cfg, [SlowThenStop()])
    first = tuner.run()
    spent = first.steps[-1].elapsed_s
    assert first.end.step == 3 and spent >= 2.0
    again = FineTuner.resume(tuner.run_dir.name, runs_dir=str(tmp_path)).run()
    resumed = [s.elapsed_s for s in again.steps if s.step > 3]
    assert resumed and min(resumed) > spent and again.end.elapsed_s > spent
    run = load_run(tuner.run_dir)
    assert run.steps.elapsed_s.is_monotonic_increasing and run.state["elapsed_s"] > spent
