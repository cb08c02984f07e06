"""The runlora-nb command: each subcommand runs and prints what it promises."""

from __future__ import annotations

import json
import subprocess
import sys

import pandas as pd
import pytest

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


# ------------------------------------------------------------- bad input: one clean error line, before any work


def _clean_error(capsys, *fragments: str) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.count("\n") == 1, err
    assert err.startswith("runlora-nb: error: "), err
    for fragment in fragments:
        assert fragment in err, (fragment, err)
    return err


@pytest.mark.parametrize(
    ("argv", "fragments"),
    [
        (["bench", "layer", "--reps", "0"], ["--reps", "positive integer"]),
        (["bench", "layer", "--warmup", "-1"], ["--warmup"]),
        (["bench", "model", "--batch", "0"], ["--batch", "positive integer"]),
        (["bench", "model", "--seq", "x"], ["--seq", "integer"]),
        (["demo", "--steps", "-5"], ["--steps", "positive integer"]),
        (["demo", "--steps", "0"], ["--steps", "positive integer"]),
        (["plan", "--tokens", "0"], ["--tokens", "positive integer"]),
        (["plan", "--dropout", "2"], ["--dropout", "[0, 1)"]),
        (["plan", "--needs", "foo"], ["--needs", "dX, dA, dB"]),
        (["plan", "--rank", "2.5"], ["--rank", "integer"]),
    ],
)
def test_bad_arguments_are_one_clean_line_before_anything_runs(argv, fragments, capsys, monkeypatch):
    import runlora_nb.app.demo as demo

    monkeypatch.setattr(demo, "race_layer", lambda *a, **k: pytest.fail("the demo must not start"))
    assert main(argv) == 2
    _clean_error(capsys, *fragments)


def test_cuda_on_a_cpu_machine_is_a_clean_error(capsys, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert main(["bench", "layer", "--device", "cuda", "--reps", "1"]) == 2
    _clean_error(capsys, "--device", "use --device cpu")
    from runlora_nb.measure import LayerSpec

    with pytest.raises(ValueError, match="device='cpu'"):
        LayerSpec(device="cuda")


def test_race_functions_refuse_zero_reps():
    from runlora_nb.measure import LayerSpec, race_layer, race_model

    with pytest.raises(ValueError, match="reps must be >= 1"):
        race_layer(LayerSpec(8, 8, 8, 2), reps=0)
    with pytest.raises(ValueError, match="batch=0"):
        race_model("tiny-llama", batch=0)


def test_demo_out_is_an_existing_file(tmp_path, capsys):
    out = tmp_path / "report"
    out.write_text("not a folder")
    assert main(["demo", "--fast", "--out", str(out)]) == 2
    _clean_error(capsys, "exists and is not a folder")
    from runlora_nb.app.demo import run_demo

    with pytest.raises(ValueError, match="steps must be a positive integer"):
        run_demo(tmp_path / "d", fast=True, steps=0)


def test_read_only_cache_is_a_clean_error(tmp_path, capsys, monkeypatch):
    blocker = tmp_path / "file"
    blocker.write_text("x")  # a cache root below a plain file cannot be created, even by root
    monkeypatch.setenv("RUNLORA_NB_CACHE", str(blocker / "cache"))
    monkeypatch.delenv("RUNLORA_NB_MODEL_CACHE", raising=False)
    assert main(["plan", "--tokens", "64", "--in", "32", "--out", "32", "--rank", "4", "--recalibrate"]) == 2
    _clean_error(capsys, "RUNLORA_NB_CACHE")


def test_plan_mode_flops_prices_by_formulas_only(capsys, monkeypatch):
    from runlora_nb.planning import costmodel, planner, timing

    def boom(*args, **kwargs):
        raise AssertionError("plan --mode flops must not time or allocate anything")

    for module, name in [(timing, "pair_step"), (planner, "pair_step"), (planner, "interleaved")]:
        monkeypatch.setattr(module, name, boom)
    monkeypatch.setattr(costmodel, "calibrate", boom)
    monkeypatch.setattr(planner, "time_pairs", boom)
    assert main(["plan", "--tokens", "200000", "--in", "16384", "--out", "16384", "--mode", "flops"]) == 0
    out = capsys.readouterr().out
    assert "[flops]" in out and "[auto]" not in out and "[timed]" not in out


def test_huge_layer_race_is_refused_before_allocating(capsys, monkeypatch):
    import runlora_nb.measure.layer_race as layer_race
    from runlora_nb.common import sysmem

    monkeypatch.setattr(layer_race, "make_base", lambda *a, **k: pytest.fail("allocated before the check"))
    if sysmem.available_bytes() is None or sysmem.available_bytes()[0] > 64 << 30:
        monkeypatch.setattr(sysmem, "available_bytes", lambda device="cpu": (24 << 30, "test"))
    argv = ["bench", "layer", "--tokens", "200000", "--in", "16384", "--out", "16384", "--reps", "1"]
    assert main(argv) == 2
    _clean_error(capsys, "GiB", "available", "--tokens")

    monkeypatch.setattr(sysmem, "available_bytes", lambda device="cpu": (1 << 20, "test"))
    with pytest.raises(ValueError, match=r"(?s)needs about .*MiB.*only 1\.0 MiB is available"):
        layer_race.race_layer(layer_race.LayerSpec(4096, 256, 256, 4), reps=1)


def test_timed_planner_refuses_a_shape_that_cannot_fit(monkeypatch):
    from runlora_nb.common import sysmem
    from runlora_nb.planning import planner

    monkeypatch.setattr(sysmem, "available_bytes", lambda device="cpu": (1 << 20, "test"))
    monkeypatch.setattr(planner, "pair_step", lambda *a, **k: pytest.fail("allocated before the check"))
    planner.clear_cache()
    with pytest.raises(ValueError, match=r"(?s)planner \(mode 'timed'\).*mode='flops'"):
        planner.plan_chains(8192, 512, 512, 4, mode="timed")


def test_train_seq_beyond_the_positions_is_a_clean_error(tmp_path, capsys):
    argv = ["train", "--model", "tiny-gpt2", "--seq", "1024", "--steps", "1", "--runs-dir", str(tmp_path)]
    assert main(argv) == 2
    _clean_error(capsys, "seq_len=1024", "512 positions", "seq_len <= 512")


def test_fetch_force_repairs_a_corrupt_cache(tmp_path, capsys, monkeypatch):
    from pathlib import Path

    from runlora_nb.assets import zoo

    sys.path.insert(0, str(Path(__file__).parents[1] / "assets"))
    from test_zoo import _fake_fetch, _zero_tail

    monkeypatch.setenv("RUNLORA_NB_MODEL_CACHE", str(tmp_path / "models"))
    calls = _fake_fetch(monkeypatch)
    assert main(["fetch", "minilm-l6"]) == 0 and len(calls) == 1
    assert main(["fetch", "minilm-l6"]) == 0 and len(calls) == 1
    assert "already cached (files verified)" in capsys.readouterr().out
    _zero_tail(tmp_path / "models" / "minilm-l6" / "model.safetensors", 4096)
    assert main(["models"]) == 0
    row = next(line for line in capsys.readouterr().out.splitlines() if line.strip().startswith("minilm-l6"))
    assert "False" in row  # cached=False: the sha256 check failed
    assert main(["fetch", "minilm-l6"]) == 0 and len(calls) == 2  # a damaged copy is fetched again
    assert "damaged" in capsys.readouterr().out and zoo.is_cached("minilm-l6")
    assert main(["fetch", "minilm-l6", "--force"]) == 0 and len(calls) == 3
    assert zoo.is_cached("minilm-l6")


def test_train_from_a_yaml_config(tmp_path, capsys):
    from runlora_nb.ledger import list_runs

    (tmp_path / "run.yaml").write_text(
        "model: tiny-llama\nsteps: 2\nr: 4\nseq_len: 32\nbatch_size: 2\neval_interval: 0\nsample_prompts: []\n"
    )
    runs = tmp_path / "runs"
    assert main(["train", "--config", str(tmp_path / "run.yaml"), "--runs-dir", str(runs)]) == 0
    df = list_runs(runs)
    assert len(df) == 1 and df.iloc[0]["status"] == "finished"
    capsys.readouterr()
    (tmp_path / "bad.yaml").write_text("model: tiny-llama\nlearning_rate: 1e-3\n")
    assert main(["train", "--config", str(tmp_path / "bad.yaml"), "--runs-dir", str(runs)]) == 2
    _clean_error(capsys, "unknown field(s) learning_rate", "valid fields:")
