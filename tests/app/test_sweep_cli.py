"""``runlora-nb sweep``: prints a leaderboard, the same command resumes, bad input is one clear message."""

from __future__ import annotations

import pandas as pd

from runlora_nb.app.cli import main
from runlora_nb.app.sweep_cli import _space
from runlora_nb.ledger import list_runs


def _args(tmp_path, *extra):
    return ["sweep", "--model", "tiny-llama", "--dataset", "sonnets", "--r", "2,4", "--lr", "3e-3", "--steps",
            "2", "--trials", "2", "--study", "cli", "--storage", str(tmp_path / "s.db"), "--runs-dir",
            str(tmp_path / "runs"), "--seq", "32", "--batch", "4", "--pruner", "none", *extra]  # fmt: skip


def test_cli_sweep_prints_a_leaderboard_and_the_same_command_resumes(tmp_path, capsys):
    csv = tmp_path / "board.csv"
    assert main(_args(tmp_path, "--csv", str(csv))) == 0
    out = capsys.readouterr().out
    assert "val_loss" in out and "tokens/s" in out and "peak MiB" in out and "complete" in out
    board = pd.read_csv(csv)
    assert sorted(board.r) == [2, 4] and (board.status == "complete").all()
    assert set(board.run_id) == set(list_runs(tmp_path / "runs").id)  # every trial is a ledger run
    assert main(_args(tmp_path)) == 0  # same command: resumes a finished sweep, runs nothing new
    assert len(list_runs(tmp_path / "runs")) == 2 and capsys.readouterr().out.count("complete") == 2


def test_cli_sweep_bad_input_is_one_clear_message(tmp_path, capsys):
    assert main([*_args(tmp_path), "--lr", "3e-3:1e-3"]) == 2
    assert "the range of lr is inverted" in capsys.readouterr().err
    blocker = tmp_path / "file"
    blocker.write_text("")
    assert main([*_args(tmp_path), "--storage", str(blocker / "s.db")]) == 2
    assert "is not writable" in capsys.readouterr().err
    assert main([*_args(tmp_path), "--r", "4,x"]) == 2
    assert "'x' in '4,x' is not a valid int" in capsys.readouterr().err
    assert not list_runs(tmp_path / "runs").shape[0]


def test_cli_values_become_a_search_space():
    class Args:
        r, alpha, alpha_over_r, lr, dropout = "4:16", None, "1,2", "1e-4:1e-2:log", "0"
        targets, quantization, dtype, backend, chain = "all-linear,q_proj+v_proj", "none", None, "peft", None
        use_rslora, lora_plus_ratio = None, None

    space = _space(Args)
    assert space.r == (4, 16, False) and space.lr == (1e-4, 1e-2, True) and space.alpha_over_r == [1.0, 2.0]
    assert space.targets == ["all-linear", ("q_proj", "v_proj")] and space.quantization is None
    assert space.dropout == 0.0 and space.backend == "peft"


def test_cli_sweep_storage_that_is_not_a_database_is_one_line(tmp_path, capsys):
    notes = tmp_path / "notes.txt"
    notes.write_text("not a database\n")
    assert main([*_args(tmp_path), "--storage", str(notes)]) == 2
    err = capsys.readouterr().err
    assert "notes.txt" in err and "is not a SQLite database" in err and "Traceback" not in err
    assert notes.read_text() == "not a database\n"
