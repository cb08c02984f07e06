"""``runlora-nb`` input validation: flags against a YAML config, and arguments refused with one clean line."""

from __future__ import annotations

import pytest

from runlora_nb.app import runs_cli
from runlora_nb.app.cli import _parser, main
from runlora_nb.train import FineTuneConfig


def _train_config(*argv: str) -> FineTuneConfig:
    return runs_cli.train_config(_parser().parse_args(["train", *argv]))


def test_flags_given_on_the_command_line_override_the_yaml(tmp_path):
    (tmp_path / "run.yaml").write_text("model: tiny-gpt2\nsteps: 7\nr: 4\nalpha: 12\nlr: 3e-3\nseq_len: 32\n")
    cfg = _train_config("--config", str(tmp_path / "run.yaml"), "--steps", "3", "--lr", "1e-2", "--seq", "64")
    assert (cfg.model, cfg.steps, cfg.lr, cfg.seq_len) == ("tiny-gpt2", 3, 1e-2, 64)  # flags win
    assert (cfg.r, cfg.alpha) == (4, 12)  # the YAML's values where no flag was given
    cfg = _train_config("--config", str(tmp_path / "run.yaml"), "--rank", "2", "--no-samples")
    assert (cfg.r, cfg.alpha, cfg.sample_prompts) == (2, 12, ())
    (tmp_path / "bare.yaml").write_text("steps: 5\n")
    cfg = _train_config("--config", str(tmp_path / "bare.yaml"), "--rank", "4")
    assert (cfg.r, cfg.alpha) == (4, 8)  # alpha given nowhere: 2·rank, as without --config


def test_one_default_model_with_and_without_a_yaml(tmp_path):
    (tmp_path / "run.yaml").write_text("steps: 5\n")
    from_yaml = _train_config("--config", str(tmp_path / "run.yaml"))
    from_flags = _train_config()
    assert from_yaml.model == from_flags.model == FineTuneConfig().model
    assert from_flags == FineTuneConfig(sample_prompts=FineTuneConfig.sample_prompts)  # defaults agree too


def test_train_help_says_flags_override_the_yaml(capsys):
    assert main(["train", "--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "flags given on the command line override the YAML" in text
    assert f"(default {FineTuneConfig().model})" in text


@pytest.mark.parametrize("value", ["2.5", "two"])
def test_fractional_steps_on_the_command_line_are_refused(value, capsys):
    assert main(["train", "--steps", value]) == 2
    err = capsys.readouterr().err
    assert err.startswith("runlora-nb: error: argument --steps") and "expected an integer" in err


def test_memory_refuses_a_sequence_past_the_positions(capsys):
    assert main(["memory", "--model", "tiny-llama", "--seq", "100000", "--no-measure"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("runlora-nb: error: memory --seq: seq_len=100000 exceeds the 512 positions")
    assert "'tiny-llama' (max_position_embeddings in its config)" in err and "Traceback" not in err


def test_export_accepts_a_run_folder_for_adapter(tmp_path, capsys):
    from runlora_nb.assets.zoo import load_model
    from runlora_nb.integrations.adapters import save_adapter
    from runlora_nb.integrations.inject import apply_runlora

    model, _ = load_model("tiny-llama")
    save_adapter(apply_runlora(model, r=4, alpha=8), tmp_path / "run" / "adapter")
    argv = ["export", "--model", "tiny-llama", "--adapter", str(tmp_path / "run"), "--format", "peft"]
    assert main([*argv, "--out", str(tmp_path / "out")]) == 0
    assert (tmp_path / "out" / "adapter_config.json").is_file()
    assert main(["export", "--help"]) == 0
    assert "RUN_DIR: its adapter/ is used" in " ".join(capsys.readouterr().out.split())


def test_runs_list_of_a_missing_folder_says_so_and_creates_nothing(tmp_path, capsys):
    from runlora_nb.ledger import list_runs

    missing = tmp_path / "typo"
    assert main(["runs", "list", "--runs-dir", str(missing)]) == 0
    assert f"no runs in {missing}: the folder does not exist" in capsys.readouterr().out
    assert list_runs(missing).empty and not missing.exists()


@pytest.mark.parametrize("command", [["show", "some-run"], ["rm", "some-run"]])
def test_runs_show_and_rm_in_a_missing_folder_create_nothing(tmp_path, capsys, command):
    missing = tmp_path / "typo"
    assert main(["runs", *command, "--runs-dir", str(missing)]) == 2
    assert "no run 'some-run'" in capsys.readouterr().err and not missing.exists()


def test_runs_list_prints_the_start_to_the_second(tmp_path, capsys):
    import json

    run = tmp_path / "20261208-010334-runlora-1a2b3c4d"
    run.mkdir()
    config = {"id": run.name, "config": {"model": "tiny-llama", "r": 4, "steps": 2}}
    (run / "config.json").write_text(json.dumps(config))
    (run / "status.json").write_text(json.dumps({"status": "finished", "started": 1796691814.123456789}))
    assert main(["runs", "list", "--runs-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "2026-12-08 01:03:34" in out and "01:03:34." not in out


def test_peft_export_of_a_zoo_model_names_its_base(tmp_path):
    import json

    from runlora_nb.assets.zoo import load_model
    from runlora_nb.integrations.adapters import save_adapter
    from runlora_nb.integrations.inject import apply_runlora

    model, _ = load_model("tiny-llama")
    save_adapter(apply_runlora(model, r=4, alpha=8), tmp_path / "adapter")
    saved = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert saved["base_model_name_or_path"] == "tiny-llama"
    argv = ["export", "--model", "tiny-llama", "--adapter", str(tmp_path / "adapter"), "--format", "peft"]
    assert main([*argv, "--out", str(tmp_path / "out")]) == 0
    exported = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert exported["base_model_name_or_path"] == "tiny-llama"  # load_model("tiny-llama") builds it again
