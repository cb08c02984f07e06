"""The run ledger: unique run folders, what a run records, interrupted runs, list/load/compare/rm, the CLI."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

from runlora_nb.app.cli import main
from runlora_nb.ledger import folders, list_runs, load_run, new_run_dir, recorded_tuner, remove_run
from runlora_nb.ledger.run_compare import compare
from runlora_nb.train import FineTuneConfig, FineTuner, engine

QUICK = {
    "model": "tiny-llama",
    "lr": 3e-3,
    "seq_len": 32,
    "batch_size": 4,
    "eval_batches": 1,
    "sample_tokens": 4,
}


def test_run_ids_are_unique_within_one_second(tmp_path, monkeypatch):
    """Two runs started in the same second must get their own folders (a timestamp alone would be shared)."""
    monkeypatch.setattr(folders.time, "strftime", lambda fmt: "20260101-000000")
    a, b = new_run_dir("runlora", tmp_path), new_run_dir("runlora", tmp_path)
    assert a != b and a.is_dir() and b.is_dir()
    assert a.name.startswith("20260101-000000-runlora-")


def test_no_ledger_default_adapter_folders_do_not_collide(tmp_path, monkeypatch):
    """Without a ledger the default adapter folder is a fresh unique folder per run, and no run is recorded."""
    monkeypatch.setattr(engine.time, "strftime", lambda fmt: "20260101-000000")
    cfg = FineTuneConfig(**QUICK, steps=1, eval_interval=0, sample_prompts=(), runs_dir=str(tmp_path))
    dirs = {FineTuner(cfg).run().end.adapter_dir for _ in range(2)}
    assert len(dirs) == 2 and all("20260101-000000-runlora-" in d for d in dirs)
    assert list_runs(tmp_path).empty


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    ids = []
    for lr in (3e-3, 1e-3):
        cfg = FineTuneConfig(
            **{**QUICK, "lr": lr}, steps=4, eval_interval=2, checkpoint_every=2, runs_dir=str(root)
        )
        tuner = recorded_tuner(cfg)
        tuner.run()
        ids.append(tuner.run_dir.name)
    return root, ids


def test_a_run_records_config_metrics_samples_status_and_adapter(two_runs):
    root, ids = two_runs
    run = load_run(ids[0], root)
    assert run.status == "finished" and run.config["lr"] == 3e-3
    assert run.info["versions"]["torch"] and run.info["versions"]["runlora_nb"]
    assert set(run.plans.columns) >= {"module", "fwd", "bwd"} and (run.plans.fwd != "").all()
    assert list(run.steps.step) == [1, 2, 3, 4]
    for col in ("train_loss", "lr", "tokens_per_s", "step_s", "saved_bytes", "peak_mem_bytes"):
        assert run.steps[col].notna().all(), col
    assert run.steps.saved_bytes.iloc[0] > 0 and run.steps.peak_mem_bytes.iloc[-1] > 0
    assert list(run.evals.step) == [0, 2, 4] and run.evals.val_loss.notna().all()
    assert list(run.samples.stage) == ["before", "after"]
    assert run.adapter_dir == str(run.path / "adapter")
    assert (run.path / "adapter" / "adapter_config.json").exists() and run.checkpoint is not None
    assert not list(run.path.rglob("*.tmp"))  # atomic writes leave no temporaries


def test_list_compare_and_rm(two_runs, tmp_path):
    root, ids = two_runs
    table = list_runs(root)
    assert set(ids) <= set(table.id) and (table.set_index("id").loc[ids, "status"] == "finished").all()
    cmp = compare(ids, root)
    assert set(cmp.curves.metric) == {"train_loss", "val_loss"} and set(cmp.curves.run) == set(ids)
    assert list(cmp.config_diff.field) == ["lr"]
    assert cmp.config_diff.iloc[0][ids[1]] == 1e-3
    assert len(cmp.figure["data"]) == 4 and json.dumps(cmp.figure)  # plain JSON spec
    with pytest.raises(ValueError, match="at least one"):
        compare([], root)
    with pytest.raises(ValueError, match="no run 'nope'"):
        load_run("nope", root)


def test_a_run_whose_process_died_is_interrupted(two_runs, tmp_path):
    root, ids = two_runs
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    run = load_run(ids[1], root)
    status = json.loads((run.path / "status.json").read_text())
    status.update(status="running", pid=dead.pid)
    (run.path / "status.json").write_text(json.dumps(status))
    with open(run.path / "metrics.jsonl", "a") as fh:
        fh.write('{"kind": "step", "step": 5, "train_lo')  # a line torn by the kill
    run = load_run(ids[1], root)
    assert run.status == "interrupted" and run.steps.step.max() == 4
    status["pid"] = os.getpid()  # this process, but not running that run any more
    (run.path / "status.json").write_text(json.dumps(status))
    assert load_run(ids[1], root).status == "interrupted"


def test_cli_runs_list_show_compare_rm(two_runs, tmp_path, capsys):
    root, ids = two_runs
    assert main(["runs", "list", "--runs-dir", str(root)]) == 0
    assert ids[0] in capsys.readouterr().out
    assert main(["runs", "show", ids[0], "--runs-dir", str(root)]) == 0
    assert "finished" in capsys.readouterr().out
    fig = tmp_path / "fig.json"
    assert main(["runs", "compare", *ids, "--runs-dir", str(root), "--json", str(fig)]) == 0
    assert "lr" in capsys.readouterr().out and json.loads(fig.read_text())["data"]
    assert main(["runs", "show", "nope", "--runs-dir", str(root)]) == 2
    victim = new_run_dir("runlora", root)
    (victim / "config.json").write_text(json.dumps({"id": victim.name, "config": {}}))
    assert main(["runs", "rm", victim.name, "--runs-dir", str(root)]) == 0
    assert not victim.exists()
    with pytest.raises(ValueError, match="no run"):
        remove_run(victim.name, root)


def test_rm_refuses_folders_that_are_not_ledger_runs(tmp_path, monkeypatch, capsys):
    """A model folder, an export and a project folder all hold a config.json; none of them is a run."""
    root = tmp_path / "runs"
    model = root / "tiny-model"  # even inside the ledger root
    model.mkdir(parents=True)
    (model / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 8}))
    project = tmp_path / "project"
    project.mkdir()
    (project / "config.json").write_text(json.dumps({"config": {"lr": 1}}))
    (project / "train.py").write_text("print('mine')")
    monkeypatch.chdir(project)
    for target in (str(model), model.name, ".", str(project)):
        with pytest.raises(ValueError, match="is not a run of the ledger"):
            remove_run(target, root)
        assert main(["runs", "rm", target, "--force", "--runs-dir", str(root)]) == 2
        assert "not a run of the ledger" in capsys.readouterr().err
    assert (model / "config.json").is_file() and (project / "train.py").is_file()
    assert list_runs(root).empty  # the model folder under the root is not listed as a run either


def test_a_run_read_back_is_the_same_history_as_the_live_one(tmp_path):
    cfg = FineTuneConfig(
        **QUICK, steps=3, eval_interval=2, sample_prompts=("Shall I",), runs_dir=str(tmp_path)
    )
    tuner = recorded_tuner(cfg)
    live = tuner.run()
    back = load_run(tuner.run_dir).history()
    assert back.losses()[["step", "loss", "tokens", "tokens_per_s"]].equals(
        live.losses()[["step", "loss", "tokens", "tokens_per_s"]]
    )
    assert back.eval_table()[["step", "val_loss", "tokens"]].equals(
        live.eval_table()[["step", "val_loss", "tokens"]]
    )
    assert back.tokens_per_s == live.tokens_per_s
    assert compare([tuner.run_dir.name], tmp_path).summary.tokens_per_s.iloc[0] == live.tokens_per_s
    assert [(s.stage, s.text) for s in back.samples] == [(s.stage, s.text) for s in live.samples]


def test_rm_force_never_deletes_a_run_alive_here(tmp_path):
    """Deleting a live run's folder left a ghost: its process wrote status and checkpoints back into it."""
    cfg = FineTuneConfig(**QUICK, steps=3, eval_interval=0, checkpoint_every=1, sample_prompts=(),
                         runs_dir=str(tmp_path))  # fmt: skip

    class RmAt:
        def on_start(self, event):
            self.run_id = event.run_id

        def on_step(self, event):
            if event.step == 2:
                with pytest.raises(ValueError, match=r"still running.*--force does not delete a live run"):
                    remove_run(self.run_id, tmp_path, force=True)

    tuner = recorded_tuner(cfg, [RmAt()])
    tuner.run()
    assert load_run(tuner.run_dir).status == "finished" and tuner.run_dir.is_dir()


def test_a_run_folder_removed_under_the_run_stays_removed(tmp_path):
    cfg = FineTuneConfig(**QUICK, steps=4, eval_interval=0, checkpoint_every=1, sample_prompts=(),
                         runs_dir=str(tmp_path))  # fmt: skip

    class RemoveAt:  # what `runs rm --force` from another machine does to a live run
        def on_start(self, event):
            self.run_id = event.run_id

        def on_step(self, event):
            if event.step == 2:
                shutil.rmtree(tmp_path / self.run_id)

    tuner = recorded_tuner(cfg, [RemoveAt()])
    with pytest.raises(RuntimeError, match="was removed while run"):
        tuner.run()
    assert not tuner.run_dir.exists() and list_runs(tmp_path).empty


def test_rm_of_a_run_marked_running_on_another_machine_needs_force(tmp_path, capsys):
    victim = new_run_dir("runlora", tmp_path)
    (victim / "config.json").write_text(json.dumps({"id": victim.name, "config": {}}))
    (victim / "status.json").write_text(json.dumps({"status": "running", "pid": 1, "host": "elsewhere"}))
    assert main(["runs", "rm", victim.name, "--runs-dir", str(tmp_path)]) == 2
    assert "cannot check" in capsys.readouterr().err and victim.is_dir()
    assert main(["runs", "rm", victim.name, "--force", "--runs-dir", str(tmp_path)]) == 0
    assert not victim.exists()


def test_a_run_failing_at_setup_or_interrupted_by_ctrl_c_is_listed_with_its_status(tmp_path):
    bad = FineTuneConfig(**QUICK, dataset=str(tmp_path / "missing.txt"), runs_dir=str(tmp_path / "runs"))
    with pytest.raises(Exception):  # noqa: B017 - whatever the loader raises, the run is recorded as failed
        recorded_tuner(bad).run()
    (failed,) = list_runs(tmp_path / "runs").itertuples()
    assert failed.status == "failed" and load_run(failed.id, tmp_path / "runs").state["message"]

    class CtrlC:
        def on_step(self, event):
            raise KeyboardInterrupt

    cfg = FineTuneConfig(**QUICK, steps=3, sample_prompts=(), runs_dir=str(tmp_path / "ctrl"))
    with pytest.raises(KeyboardInterrupt):
        recorded_tuner(cfg, [CtrlC()]).run()
    assert list(list_runs(tmp_path / "ctrl").status) == ["interrupted"]
