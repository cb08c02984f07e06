"""`runlora-nb memory` and `runlora-nb export` end to end, in-process."""

from __future__ import annotations

import errno
import json

import pytest
import torch

from runlora_nb.app.cli import main
from runlora_nb.assess import export as export_mod
from runlora_nb.assess.parity import ParityWarning
from runlora_nb.assets.zoo import load_model
from runlora_nb.integrations.adapters import save_adapter
from runlora_nb.integrations.inject import apply_runlora


def test_memory_predicts_measures_and_fits_a_budget(capsys):
    assert (
        main(["memory", "--model", "tiny-llama", "--batch", "2", "--seq", "64", "--budget-gib", "0.01"]) == 0
    )
    out = capsys.readouterr().out
    assert "activation" in out and "temporaries" in out
    assert "measured runlora: saved activations" in out and "ratio 1.000" in out
    assert "one step's peak" in out and "lower bound" in out  # the OS's reading next to the hooks'
    # 10 MiB cannot hold the process itself: nothing is run, and the answer says batch 0
    assert "largest batch within 0.01 GiB at seq 64, runlora: 0" in out


@pytest.mark.parametrize("argv", [["--batch", "0"], ["--seq", "-3"], ["--budget-gib", "0"]])
def test_memory_bad_arguments_are_one_clear_line(argv, capsys):
    assert main(["memory", *argv]) == 2
    err = capsys.readouterr().err
    assert "must be a positive" in err and "Traceback" not in err


def test_export_peft_writes_the_adapter_and_a_parity_report(tmp_path, capsys):
    model, _ = load_model("tiny-llama")
    apply_runlora(model, r=4, alpha=8, target_modules="all-linear")
    save_adapter(model, tmp_path / "adapter")
    out = tmp_path / "export"
    assert main(["export", "--model", "tiny-llama", "--adapter", str(tmp_path / "adapter"),
                 "--format", "peft", "--out", str(out)]) == 0  # fmt: skip
    assert "peft export:" in capsys.readouterr().out
    assert (out / "adapter_config.json").is_file()
    assert "max_logit_diff" in json.dumps(json.loads((out / "parity.json").read_text()))


def test_export_refuses_a_non_empty_folder_unless_forced(tmp_path, capsys):
    model, _ = load_model("tiny-llama")
    apply_runlora(model, r=4, alpha=8, target_modules="all-linear")
    save_adapter(model, tmp_path / "adapter")
    out = tmp_path / "data"
    out.mkdir()
    (out / "train.jsonl").write_text('{"text": "mine"}\n')
    argv = ["export", "--model", "tiny-llama", "--adapter", str(tmp_path / "adapter"), "--format", "peft",
            "--out", str(out)]  # fmt: skip
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert str(out) in err and "--force" in err and "Traceback" not in err
    assert (out / "train.jsonl").read_text() == '{"text": "mine"}\n'
    assert main([*argv, "--force"]) == 0
    assert (out / "adapter_config.json").is_file() and not (out / "train.jsonl").exists()


def test_export_of_a_missing_adapter_is_an_error_line(tmp_path, capsys):
    code = main(
        ["export", "--model", "tiny-llama", "--adapter", str(tmp_path / "nope"), "--out", str(tmp_path / "x")]
    )
    assert code == 2
    err = capsys.readouterr().err
    assert err.startswith("runlora-nb: error:") and "Traceback" not in err


def test_export_on_a_full_disk_is_one_line_and_keeps_the_previous_export(tmp_path, capsys, monkeypatch):
    model, _ = load_model("tiny-llama")
    apply_runlora(model, r=4, alpha=8, target_modules="all-linear")
    save_adapter(model, tmp_path / "adapter")
    out = tmp_path / "export"
    argv = ["export", "--model", "tiny-llama", "--adapter", str(tmp_path / "adapter"), "--format", "peft",
            "--out", str(out)]  # fmt: skip
    assert main(argv) == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    capsys.readouterr()

    def full_disk(model, tokenizer, tmp, prompts):
        (tmp / "adapter_model.safetensors").write_bytes(b"half")
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp / "adapter_model.safetensors"))

    monkeypatch.setattr(export_mod, "_export_peft", full_disk)
    assert main(argv) != 0
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert str(out) in err and "bytes" in err and "--out" in err
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".export.")] == []


def test_export_whose_artefact_fails_parity_exits_non_zero_with_one_line(tmp_path, capsys, monkeypatch):
    """A broken artefact (the last block's MLP zeroed on the way out) used to print "parity ... OK"."""
    model, _ = load_model("tiny-llama")
    apply_runlora(model, r=4, alpha=8, target_modules="all-linear")
    save_adapter(model, tmp_path / "adapter")
    merged_copy = export_mod.merged_copy

    def broken_copy(model):
        copy = merged_copy(model)
        with torch.no_grad():
            for p in copy.model.layers[-1].mlp.parameters():
                p.zero_()
        return copy

    monkeypatch.setattr(export_mod, "merged_copy", broken_copy)
    out = tmp_path / "export"
    argv = ["export", "--model", "tiny-llama", "--adapter", str(tmp_path / "adapter"), "--format", "merged",
            "--out", str(out)]  # fmt: skip
    with pytest.warns(ParityWarning):
        assert main(argv) == 1
    captured = capsys.readouterr()
    assert "parity merged (float32): FAILED (logit" in captured.out
    err = captured.err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("runlora-nb: error: export parity failed (logit")
    assert str(out / "parity.json") in err[0] and "Traceback" not in captured.err
    assert json.loads((out / "parity.json").read_text())["ok"] is False


def test_export_gguf_to_a_gguf_path_writes_that_file_not_a_folder(tmp_path, capsys):
    import gguf

    model, _ = load_model("tiny-llama")
    apply_runlora(model, r=4, alpha=8, target_modules="all-linear")
    save_adapter(model, tmp_path / "adapter")
    out = tmp_path / "model.gguf"
    argv = ["export", "--model", "tiny-llama", "--adapter", str(tmp_path / "adapter"), "--format", "gguf",
            "--dtype", "f32", "--out", str(out)]  # fmt: skip
    assert main(argv) == 0
    assert "gguf export:" in capsys.readouterr().out
    assert out.is_file() and not out.is_dir()
    assert gguf.GGUFReader(out).fields["tokenizer.ggml.pre"].contents() == "default"
    assert json.loads((tmp_path / "model.parity.json").read_text())["file"] == "model.gguf"
    assert (tmp_path / "model.Modelfile").read_text().startswith("FROM ./model.gguf\n")
    assert main(argv) == 2  # the files exist: refused, one line, kept
    assert "already exist" in capsys.readouterr().err and out.is_file()


def test_export_gguf_adapter_writes_the_adapter_and_a_modelfile_from_the_given_base(tmp_path, capsys):
    model, _ = load_model("tiny-llama")
    apply_runlora(model, r=4, alpha=8, target_modules="all-linear")
    save_adapter(model, tmp_path / "adapter")
    out = tmp_path / "lora"
    assert main(["export", "--model", "tiny-llama", "--adapter", str(tmp_path / "adapter"),
                 "--format", "gguf-adapter", "--dtype", "f32", "--base-gguf", "/models/base.gguf",
                 "--out", str(out)]) == 0  # fmt: skip
    printed = capsys.readouterr().out
    assert "adapter check gguf-adapter: OK" in printed and "gguf-adapter export:" in printed
    assert (out / "Modelfile").read_text() == "FROM /models/base.gguf\nADAPTER ./adapter.gguf\n"
    assert (out / "adapter.gguf").is_file() and not (out / "base.gguf").exists()
    assert json.loads((out / "parity.json").read_text())["ok"] is True
