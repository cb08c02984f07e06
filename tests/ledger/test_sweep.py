"""Sweeps: the search space's checks, a grid sweep (leaderboard, ledger runs, resume), pruning, Stop, the time
budget, the errors, and a sweep killed with SIGKILL mid-trial then resumed to its budget."""

from __future__ import annotations

import mmap
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time

import optuna
import pytest

from runlora_nb.ledger import SearchSpace, leaderboard, load_run, run_sweep
from runlora_nb.ledger.space import parse_values
from runlora_nb.ledger.sweep import open_study, storage_url
from runlora_nb.train import Callback

QUICK = {"seq_len": 32, "batch_size": 4, "eval_batches": 1, "eval_interval": 1}
GRID = SearchSpace(r=[2, 4], lr=[1e-3, 3e-3])


def _config(tmp_path):
    return {**QUICK, "runs_dir": str(tmp_path / "runs")}


# ------------------------------------------------------------------------------------------------- the space


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"r": []}, "r is an empty list"),
        ({"lr": (1e-2, 1e-4)}, "range of lr is inverted"),
        ({"lr": (1e-3, 1e-3)}, "range of lr is empty"),
        ({"lr": (0.0, 1e-2, True)}, "bounds of lr's range must be > 0"),
        ({"dropout": (0.0, 0.5, True)}, "log range of dropout needs low > 0"),
        ({"r": [4, 0]}, "each choice of r must be an integer >= 1"),
        ({"dtype": ("fp32", "bf16")}, "dtype is categorical"),
        ({"backend": "jax"}, r"backend must be one of \['runlora', 'peft'\]"),
        ({"r": [4, 4]}, "lists a choice twice"),
        ({"alpha": 16, "alpha_over_r": [1.0, 2.0]}, "give alpha or alpha_over_r, not both"),
        ({"lr": (1e-4, 1e-2, "log")}, r"\(low, high, log: bool\)"),
    ],
)
def test_bad_search_spaces_raise_one_clear_error(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SearchSpace(**kwargs)


def test_space_dims_unknown_parameter_grid_and_cli_values():
    with pytest.raises(ValueError, match=r"unknown parameter\(s\) \['rank'\]; known: \['r', "):
        SearchSpace.from_dict({"rank": [4, 8]})
    space = SearchSpace(r=[4, 8], lr=(1e-4, 1e-2, True), targets=["all-linear", ["q_proj", "v_proj"]])
    assert space.varying() == {
        "r": ("choice", [4, 8]),
        "lr": ("range", 1e-4, 1e-2, True),
        "targets": ("choice", ["all-linear", "q_proj,v_proj"]),
    }
    with pytest.raises(ValueError, match="grid sampler needs a list of choices for lr"):
        space.grid()
    assert SearchSpace(r=[4, 8], dtype=["fp32", "bf16"]).grid_size() == 4
    trial = optuna.trial.FixedTrial({"r": 8, "lr": 1e-3, "targets": "q_proj,v_proj"})
    assert (
        space.suggest(trial).items()
        >= {"r": 8, "alpha": 16.0, "lr": 1e-3, "targets": ("q_proj", "v_proj")}.items()
    )
    assert parse_values("4,8,16", int) == [4, 8, 16] and parse_values("8", int) == 8
    assert parse_values("1e-4:1e-2:log") == (1e-4, 1e-2, True) and parse_values("none,nf4", str) == [
        None,
        "nf4",
    ]
    with pytest.raises(ValueError, match="'x' in '4,x' is not a valid int"):
        parse_values("4,x", int)


# ------------------------------------------------------------------------------------------------- sweeps


@pytest.fixture(scope="module")
def grid_sweep(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("sweep")
    db = tmp / "s.db"
    df = run_sweep("tiny-llama", "sonnets", GRID, 2, 10, "grid", db, config=_config(tmp))
    return tmp, db, df


def test_grid_sweep_leaderboard_and_ledger_runs(grid_sweep):
    tmp, db, df = grid_sweep
    assert len(df) == 4  # the budget of 10 is capped at the grid's 4 points
    assert sorted(zip(df.r, df.lr)) == [(2, 1e-3), (2, 3e-3), (4, 1e-3), (4, 3e-3)]
    for col in ("trial", "val_loss", "perplexity", "tokens_per_s", "peak_mem_bytes", "trainable_params",
                "time_s", "status", "run_id"):  # fmt: skip
        assert col in df.columns, col
    assert set(df.status) <= {"complete", "pruned"} and (df.status == "complete").sum() >= 2
    complete = df[df.status == "complete"]
    assert list(complete.val_loss) == sorted(complete.val_loss) and df.index[
        : len(complete)
    ].tolist() == list(range(len(complete)))  # best first
    assert (df.trainable_params[df.r == 4] == 2 * df.trainable_params[df.r == 2].iloc[0]).all()
    assert df.tokens_per_s.gt(0).all() and df.peak_mem_bytes.gt(0).all() and df.time_s.gt(0).all()
    for row in df.itertuples():  # each trial is a ledger run with the trial's settings
        run = load_run(row.run_id, tmp / "runs")
        assert run.config["r"] == row.r and run.config["lr"] == row.lr and run.config["alpha"] == 2 * row.r
        assert run.status == ("finished" if row.status == "complete" else "stopped")
        if row.status == "complete":
            assert run.evals.val_loss.iloc[-1] == pytest.approx(row.val_loss)
    again = run_sweep("tiny-llama", "sonnets", GRID, 2, 10, "grid", db, config=_config(tmp))
    assert len(again) == 4 and set(again.run_id) == set(df.run_id)  # a finished sweep resumes to nothing
    assert leaderboard("grid", db).run_id.tolist() == df.run_id.tolist()


def test_resuming_with_another_space_setup_or_a_bad_storage_is_refused(grid_sweep, tmp_path):
    tmp, db, _ = grid_sweep
    with pytest.raises(ValueError, match=r"another search space \(r: stored .*\[2, 4\].*now .*\[2, 8\]"):
        run_sweep("tiny-llama", "sonnets", SearchSpace(r=[2, 8], lr=[1e-3, 3e-3]), 2, 4, "grid", db)
    with pytest.raises(ValueError, match=r"another setup \(steps: stored 2, now 3\)"):
        run_sweep("tiny-llama", "sonnets", GRID, 3, 4, "grid", db, config=_config(tmp))
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(ValueError, match=r"is not writable .*give a file in a writable folder"):
        run_sweep("tiny-llama", "sonnets", GRID, 2, 4, "x", blocker / "s.db")
    with pytest.raises(ValueError, match="is not writable"):
        storage_url(tmp_path)  # a folder, not a file
    with pytest.raises(ValueError, match=r"unknown config field\(s\) \['sequence'\]"):
        run_sweep("tiny-llama", "sonnets", GRID, 2, 4, "x", tmp_path / "a.db", config={"sequence": 3})
    with pytest.raises(ValueError, match=r"\['r'\] belong in the SearchSpace"):
        run_sweep("tiny-llama", "sonnets", GRID, 2, 4, "x", tmp_path / "a.db", config={"r": 3})
    with pytest.raises(ValueError, match="trials must be an int >= 1, got 0"):
        run_sweep("tiny-llama", "sonnets", GRID, 2, 0, "x", tmp_path / "a.db")
    with pytest.raises(ValueError, match="sampler must be one of"):
        run_sweep("tiny-llama", "sonnets", GRID, 2, 2, "x", tmp_path / "a.db", sampler="bayes")
    with pytest.raises(ValueError, match="no study 'nope'"):
        leaderboard("nope", db)
    other = optuna.create_study(study_name="foreign", storage=storage_url(tmp_path / "f.db"))
    other.optimize(lambda t: t.suggest_float("x", 0, 1), n_trials=1)
    with pytest.raises(ValueError, match="was not made by run_sweep"):
        open_study("foreign", tmp_path / "f.db", GRID)


def test_the_pruner_is_fed_each_eval_and_stops_the_run(tmp_path):
    prune_all = optuna.pruners.ThresholdPruner(upper=0.0)  # any reported loss > 0 prunes
    space = SearchSpace(r=[2], lr=[3e-3])
    df = run_sweep("tiny-llama", "sonnets", space, 4, 1, "p", tmp_path / "p.db", pruner=prune_all,
                   config=_config(tmp_path))  # fmt: skip
    (row,) = df.itertuples()
    assert row.status == "pruned" and row.val_loss > 0
    run = load_run(row.run_id, tmp_path / "runs")
    assert run.status == "stopped" and run.steps.step.max() == 1  # pruned after the first eval
    trial = optuna.load_study(study_name="p", storage=storage_url(tmp_path / "p.db")).trials[0]
    assert list(trial.intermediate_values) == [1]


def test_random_sampler_over_ranges_and_the_time_budget(tmp_path):
    class Slow(Callback):
        def on_end(self, event):
            time.sleep(2.1)

    space = SearchSpace(r=(2, 4), lr=(1e-4, 1e-2, True), dropout=[0.0, 0.1])
    df = run_sweep("tiny-llama", "sonnets", space, 1, 3, "t", tmp_path / "t.db", sampler="random",
                   timeout=2.0, callbacks=[Slow()], config=_config(tmp_path))  # fmt: skip
    assert len(df) == 1  # the time budget is spent once the first trial ends: no second one starts
    (row,) = df.itertuples()
    assert 2 <= row.r <= 4 and 1e-4 <= row.lr <= 1e-2 and row.dropout in (0.0, 0.1)
    df = run_sweep("tiny-llama", "sonnets", space, 1, 3, "t", tmp_path / "t.db", sampler="random",
                   config=_config(tmp_path))  # fmt: skip
    assert len(df) == 3 and df.status.isin(["complete", "pruned"]).all()


def test_stop_ends_the_running_trial_and_resume_reruns_it(tmp_path):
    stop = threading.Event()

    class StopAtFirstStep(Callback):
        def on_step(self, event):
            stop.set()

    kwargs = {"config": _config(tmp_path), "pruner": None}
    df = run_sweep("tiny-llama", "sonnets", GRID, 3, 2, "s", tmp_path / "s.db", stop=stop,
                   callbacks=[StopAtFirstStep()], **kwargs)  # fmt: skip
    (row,) = df.itertuples()
    assert row.status == "stopped" and load_run(row.run_id, tmp_path / "runs").status == "stopped"
    df = run_sweep("tiny-llama", "sonnets", GRID, 3, 2, "s", tmp_path / "s.db", **kwargs)
    assert list(df.status.value_counts().items()) == [("complete", 2), ("stopped", 1)]
    retried = df[(df.r == row.r) & (df.lr == row.lr) & (df.status == "complete")]
    assert len(retried) == 1  # the stopped trial's settings were queued again and finished


def test_ctrl_c_mid_trial_is_raised_and_resume_reruns_the_trial(tmp_path):
    class CtrlCInSecondTrial(Callback):
        started = 0

        def on_start(self, event):
            CtrlCInSecondTrial.started += 1

        def on_step(self, event):
            if CtrlCInSecondTrial.started == 2:
                raise KeyboardInterrupt

    kwargs = {"config": _config(tmp_path), "pruner": None}
    with pytest.raises(KeyboardInterrupt):
        run_sweep("tiny-llama", "sonnets", GRID, 2, 3, "c", tmp_path / "c.db",
                  callbacks=[CtrlCInSecondTrial()], **kwargs)  # fmt: skip
    df = run_sweep("tiny-llama", "sonnets", GRID, 2, 3, "c", tmp_path / "c.db", **kwargs).set_index("trial")
    assert df.loc[1, "status"] == "interrupted" and (df.status == "complete").sum() == 3 and len(df) == 4
    assert load_run(df.loc[1, "run_id"], tmp_path / "runs").status == "interrupted"
    assert len(df[(df.r == df.loc[1, "r"]) & (df.lr == df.loc[1, "lr"])]) == 2  # queued again once


def test_a_failing_trial_is_recorded_with_its_error_and_uses_up_budget(tmp_path):
    class FailFirstTrial(Callback):
        started = 0

        def on_start(self, event):
            FailFirstTrial.started += 1

        def on_step(self, event):
            if FailFirstTrial.started == 1:
                raise RuntimeError("boom")

    df = run_sweep("tiny-llama", "sonnets", GRID, 2, 2, "f", tmp_path / "f.db", pruner=None,
                   callbacks=[FailFirstTrial()], config=_config(tmp_path)).set_index("trial")  # fmt: skip
    assert list(df.status) == ["complete", "failed"] and df.loc[0, "error"] == "RuntimeError: boom"
    assert load_run(df.loc[0, "run_id"], tmp_path / "runs").status == "failed"


KILLED_SWEEP = textwrap.dedent(
    """
    import os, signal, sys
    from runlora_nb.ledger import SearchSpace, run_sweep
    from runlora_nb.train import Callback

    class KillInSecondTrial(Callback):
        started = 0
        def on_start(self, event):
            KillInSecondTrial.started += 1
            KillInSecondTrial.run_id = event.run_id
        def on_step(self, event):
            if KillInSecondTrial.started == 2 and event.step == 1:
                print(KillInSecondTrial.run_id, flush=True)
                os.kill(os.getpid(), signal.SIGKILL)

    run_sweep("tiny-llama", "sonnets", SearchSpace(r=[2, 4], lr=[1e-3, 3e-3]), 2, 3, "k", sys.argv[1],
              config={config}, callbacks=[KillInSecondTrial()])
    """
)


@pytest.mark.slow
def test_kill9_mid_trial_then_resume_completes_the_budget(tmp_path):
    config = _config(tmp_path)
    script = KILLED_SWEEP.replace("{config}", repr(config))
    db = tmp_path / "k.db"
    proc = subprocess.run(
        [sys.executable, "-c", script, str(db)],
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    killed_run = proc.stdout.strip().splitlines()[-1]
    study = optuna.load_study(study_name="k", storage=storage_url(db))
    assert [t.state.name for t in study.trials] == ["COMPLETE", "RUNNING"]  # optuna alone cannot tell
    first = leaderboard(study).set_index("trial")
    assert first.loc[1, "status"] == "interrupted" and first.loc[1, "run_id"] == killed_run

    df = run_sweep("tiny-llama", "sonnets", GRID, 2, 3, "k", db, config=config).set_index("trial")
    assert df.loc[0, "run_id"] == first.loc[0, "run_id"] and df.loc[0, "status"] == "complete"  # kept
    assert df.loc[1, "status"] == "interrupted" and len(df) == 4
    assert df.status.isin(["complete", "pruned"]).sum() == 3  # the budget is completed
    study = optuna.load_study(study_name="k", storage=storage_url(db))
    assert study.trials[1].state.name == "FAIL"
    (retry,) = [t for t in study.trials if t.user_attrs.get("retry_of") == 1]
    assert retry.params == study.trials[1].params  # the interrupted trial ran again
    assert load_run(killed_run, tmp_path / "runs").status == "interrupted"


def test_each_trial_reports_its_own_peak_not_the_high_water_mark_of_the_trials_before(tmp_path):
    from runlora_nb.common.sysmem import reset_peak_rss

    if not reset_peak_rss():
        pytest.skip("the peak RSS can only be reset on Linux (/proc/self/clear_refs)")
    big = 600 * 2**20
    seen: list[int] = []

    class BigFirstTrial(Callback):
        def on_step(self, event):
            if not seen:  # the first trial's first step touches 600 MiB of its own mapping, then frees it
                block = mmap.mmap(-1, big)
                for offset in range(0, big, mmap.PAGESIZE):
                    block[offset] = 1
                block.close()
                seen.append(big)

    df = run_sweep("tiny-llama", "sonnets", GRID, 2, 2, "peaks", tmp_path / "s.db", pruner=None,
                   callbacks=[BigFirstTrial()], config=_config(tmp_path))  # fmt: skip
    first, second = df.sort_values("trial").peak_mem_bytes.tolist()
    assert first >= big, f"the first trial's peak {first} misses its 600 MiB block"
    assert second < first - big // 2, f"the second trial inherited the first one's peak ({second} vs {first})"


def test_a_storage_that_is_not_a_database_is_refused_with_the_fix(tmp_path):
    """A text file given as the storage gave a raw SQLAlchemy error."""
    notes = tmp_path / "notes.txt"
    notes.write_text("my notes\n")
    with pytest.raises(ValueError, match=r"notes\.txt' is not a SQLite database.*new file name.*--storage"):
        open_study("s", notes, GRID)
    with pytest.raises(ValueError, match="is not a SQLite database"):
        run_sweep("tiny-llama", "sonnets", GRID, 2, 1, "s", notes, config=_config(tmp_path))
    assert notes.read_text() == "my notes\n"
    open_study("s", tmp_path / "new.db", GRID)  # a new (empty) file becomes a database
    assert open_study("s", tmp_path / "new.db", GRID).study_name == "s"


def test_sweeps_creating_one_new_storage_at_once_all_succeed(tmp_path):
    """Sweeps opening one new storage at the same time hit "table ... already exists" / UNIQUE errors."""
    errors = []

    def open_one(db):
        try:
            open_study("s", db, GRID)
        except Exception as err:  # collected, shown by the assert
            errors.append(f"{type(err).__name__}: {err}"[:200])

    for k in range(3):
        db = tmp_path / f"s{k}.db"
        threads = [threading.Thread(target=open_one, args=(db,)) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert [s.study_name for s in optuna.get_all_study_summaries(storage_url(db))] == ["s"]
    assert errors == []


def test_a_grid_point_another_worker_is_running_is_not_trained_again(tmp_path):
    """Two workers on one grid: once every point had started, the idle one trained a running point again."""
    space = SearchSpace(r=[2, 4], lr=[3e-3])
    db, kwargs = tmp_path / "g.db", {"config": _config(tmp_path), "pruner": None}
    started, release = threading.Event(), threading.Event()

    class HoldTheFirstTrial(Callback):
        def on_start(self, event):
            started.set()
            assert release.wait(120)

    other = threading.Thread(
        target=run_sweep,
        args=("tiny-llama", "sonnets", space, 2, 2, "g", db),
        kwargs={**kwargs, "callbacks": [HoldTheFirstTrial()]},
    )
    other.start()  # worker 1: trial 0, held running on its grid point
    try:
        assert started.wait(120)
        mine = run_sweep("tiny-llama", "sonnets", space, 2, 2, "g", db, **kwargs)  # worker 2
    finally:
        release.set()
        other.join()
    assert sorted(mine.status) == ["complete", "duplicate", "running"]
    duplicate = mine[mine.status == "duplicate"].iloc[0]
    assert duplicate.run_id is None or duplicate.run_id != duplicate.run_id  # nothing was trained
    board = leaderboard("g", db)
    assert sorted(board.status) == ["complete", "complete", "duplicate"]
    trained = board[board.status == "complete"]
    assert sorted(trained.r) == [2, 4]  # each grid point trained once
    runs = sorted(p.name for p in (tmp_path / "runs").iterdir() if p.is_dir())
    assert sorted(trained.run_id) == runs
