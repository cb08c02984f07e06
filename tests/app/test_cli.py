"""The runlora-nb command: each subcommand runs and prints what it promises."""

from __future__ import annotations

import json
import subprocess
import sys

import pandas as pd

from runlora_nb.app.cli import main


def test_bench_layer_prints_table_and_writes_csv_and_json(tmp_path, capsys):
    csv, js = tmp_path / "r.csv", tmp_path / "r.json"
    code = main(
        ["bench", "layer", "--tokens", "64", "--in", "48", "--out", "32", "--rank", "4", "--dtype", "bf16",
         "--dropout", "0.1", "--reps", "1", "--csv", str(csv), "--json", str(js)]
    )  # fmt: skip
    out = capsys.readouterr().out
    assert code == 0
    assert "×frozen" in out and "×PEFT" in out and "planner (auto) chose fwd1+" in out
    df = pd.read_csv(csv)
    assert {"frozen", "peft", "runlora"} <= set(df.candidate) and (df.dtype == "bfloat16").all()
    assert len(json.loads(js.read_text())) == len(df)


def test_plan_command_lists_every_mode(capsys):
    assert main(["plan", "--tokens", "256", "--in", "64", "--out", "64", "--rank", "4"]) == 0
    out = capsys.readouterr().out
    for mode in ("flops", "auto", "timed"):
        assert f"[{mode}]" in out


def test_bench_model_on_a_tiny_model(tmp_path, capsys):
    plans = tmp_path / "plans.csv"
    code = main(
        ["bench", "model", "--model", "tiny-llama", "--batch", "1", "--seq", "16", "--rank", "4", "--reps", "1",
         "--plans", str(plans)]
    )  # fmt: skip
    out = capsys.readouterr().out
    assert code == 0 and "no adapters" in out and "chain pairs chosen per module" in out
    assert len(pd.read_csv(plans)) == 14


def test_errors_are_one_line_and_exit_2(capsys):
    assert main(["bench", "layer", "--dtype", "float8", "--reps", "1"]) == 2
    assert "runlora-nb: error: unknown dtype" in capsys.readouterr().err


def test_models_and_console_script():
    proc = subprocess.run(
        [sys.executable, "-m", "runlora_nb.app.cli", "models"],
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    )
    assert "tiny-llama" in proc.stdout and "smollm2-135m" in proc.stdout
