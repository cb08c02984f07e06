"""Device plumbing on a CPU-only machine: the device a config names, autocast choices, batches and the model moved."""

from __future__ import annotations

import pytest
import torch

from runlora_nb.train import FineTuneConfig, FineTuner, engine
from runlora_nb.train import device as dev

QUICK = {"model": "tiny-llama", "seq_len": 32, "batch_size": 4, "eval_batches": 1, "sample_tokens": 4,
         "eval_interval": 0, "sample_prompts": ()}  # fmt: skip


def test_auto_is_the_cpu_here_and_a_missing_device_is_refused_with_the_choices(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(dev, "_mps_available", lambda: False)
    assert dev.resolve_device("auto") == torch.device("cpu") == dev.resolve_device(None)
    assert dev.device_choices() == ("auto", "cpu")
    with pytest.raises(ValueError, match=r"no 'cuda' device.*\('auto', 'cpu'\)"):
        dev.resolve_device("cuda")
    with pytest.raises(ValueError, match="not a device name"):
        dev.resolve_device("gpu0")


def test_auto_prefers_cuda_then_mps(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert dev.resolve_device("auto") == torch.device("cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(dev, "_mps_available", lambda: True)
    assert dev.resolve_device("auto") == torch.device("mps")


def test_config_checks_the_device_name_and_the_autocast_choice():
    assert (
        FineTuneConfig(device="cuda:1").device == "cuda:1"
    )  # a name is portable; availability is checked at start
    with pytest.raises(ValueError, match="device must be"):
        FineTuneConfig(device="gpu")
    with pytest.raises(ValueError, match="autocast must be"):
        FineTuneConfig(autocast="fp8")


def test_autocast_auto_is_bf16_only_for_an_fp32_base_on_cuda_with_bf16(monkeypatch):
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: True)
    assert dev.autocast_dtype(cpu, "auto", "fp32") is None
    assert dev.autocast_dtype(cuda, "auto", "fp32") is torch.bfloat16
    assert dev.autocast_dtype(cuda, "auto", "bf16") is None  # a bf16 base computes in bf16 already
    assert dev.autocast_dtype(cuda, "off", "fp32") is None
    assert dev.autocast_dtype(cpu, "fp16", "fp32") is torch.float16
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: False)
    assert dev.autocast_dtype(cuda, "auto", "fp32") is None


def test_the_model_adapters_and_every_batch_go_to_the_resolved_device(monkeypatch):
    """A fake device ("meta") stands in for a GPU: the engine must put the model, its adapters and each batch
    there, and initialise the adapters before the move (same A as a CPU run)."""
    meta = torch.device("meta")
    monkeypatch.setattr(engine, "resolve_device", lambda name: meta)
    cpu_run = FineTuner(FineTuneConfig(**QUICK, steps=1))
    cpu_run.prepare()
    tuner = FineTuner(FineTuneConfig(**QUICK, steps=1))
    tuner.prepare()
    assert tuner.device == meta
    assert {p.device.type for p in tuner.model.parameters()} == {"meta"}
    seen = []
    monkeypatch.setattr(
        tuner.model,
        "forward",
        lambda **kw: seen.append({k: v.device for k, v in kw.items() if torch.is_tensor(v)}) or _Out(),
    )
    tuner._loss(next(tuner._batches()))
    assert seen and set(seen[0]) == {"input_ids", "attention_mask", "labels"}
    assert all(d == meta for d in seen[0].values())
    assert dev.move_batch({"x": torch.ones(2)}, torch.device("cpu"))["x"].device.type == "cpu"


class _Out:
    loss = torch.zeros(())


def test_a_cpu_run_reports_its_device(capsys):
    from runlora_nb.train import PrintProgress

    res = FineTuner(FineTuneConfig(**QUICK, steps=1, device="cpu"), [PrintProgress()]).run()
    assert res.end.error is None and "tokens on cpu" in capsys.readouterr().out


def test_the_cli_and_the_panels_pick_the_device(tmp_path, capsys):
    from runlora_nb.app.cli import main
    from runlora_nb.widgets.picker import PickerController
    from runlora_nb.widgets.sweep import SweepController

    picker = PickerController("tiny-llama")
    assert picker.config().device == "auto"
    picker.set(device="cpu")
    assert picker.config().device == "cpu"
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no 'cuda' device"):
            picker.set(device="cuda")
        assert picker.choice.device == "cpu"  # a refused change leaves the choice as it was
    assert SweepController(device="cpu").settings.device == "cpu"
    args = ["train", "--steps", "1", "--seq", "32", "--batch", "4", "--no-samples", "--device", "cpu",
            "--runs-dir", str(tmp_path)]  # fmt: skip
    assert main(args) == 0
    assert "tokens on cpu" in capsys.readouterr().out
