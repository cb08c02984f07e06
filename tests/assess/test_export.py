"""Export (PEFT folder, merged folder) with the parity check; errors leave nothing half-written."""

from __future__ import annotations

import errno
import json
import os
import stat

import peft
import pytest
import torch
from safetensors import SafetensorError
from testutil import tuned_llama
from transformers import AutoModelForCausalLM, modeling_utils

from runlora_nb.assess import export as export_mod
from runlora_nb.assess.export import export_model
from runlora_nb.assess.parity import ParityWarning, logit_bound, parity_report
from runlora_nb.assets.zoo import load_model
from runlora_nb.integrations.inject import get_peft_model, runlora_layers


def logits(model, tok, text="Shall I compare thee"):
    ids = tok(text, return_tensors="pt")
    with torch.no_grad():
        return model(**ids).logits.float()


def rel_diff(got, ref):
    """Normwise relative logit difference, the quantity the parity bound is on."""
    return float((got - ref).norm() / ref.norm())


def no_leftovers(out):
    return [p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")] == []


def test_peft_export_loads_in_peft_and_matches(tmp_path):
    model, tok = tuned_llama()
    out = tmp_path / "adapter"
    result = export_model(model, tok, out, "peft", verbose=False)
    assert {"adapter_config.json", "adapter_model.safetensors", "parity.json"} <= set(result.files)
    base, _ = load_model("tiny-llama")
    reloaded = peft.PeftModel.from_pretrained(base, out)
    ref, got = logits(model, tok), logits(reloaded, tok)
    bound = logit_bound(torch.float32, model.config)
    plain, _ = load_model("tiny-llama")
    assert rel_diff(logits(plain, tok), ref) > 100 * bound  # the adapter matters
    assert rel_diff(got, ref) <= bound
    stored = json.loads((out / "parity.json").read_text())
    assert stored["ok"] and stored["failed"] == [] and stored["greedy_agreement"] == 1.0
    assert stored["rel_logit_diff"] <= stored["logit_bound"] and stored["tokenizer_match"] is True


def test_merged_export_loads_offline_and_matches(tmp_path):
    model, tok = tuned_llama()
    out = tmp_path / "merged"
    result = export_model(model, tok, out, "merged", verbose=False)
    assert {"model.safetensors", "config.json", "generation_config.json", "tokenizer.json"} <= set(
        result.files
    )
    reloaded = AutoModelForCausalLM.from_pretrained(out, local_files_only=True)
    assert not any("lora" in k for k in reloaded.state_dict())
    ref, got = logits(model, tok), logits(reloaded, tok)
    assert rel_diff(got, ref) <= logit_bound(torch.float32, model.config)
    assert result.parity["ok"] and result.parity["tokenizer_match"]
    assert result.parity["ppl_change"] == pytest.approx(0.0, abs=1e-4)
    assert any(True for _ in runlora_layers(model))  # the tuned model itself is left unmerged
    assert no_leftovers(out)


def test_merged_export_of_a_peft_model(tmp_path):
    base, tok = load_model("tiny-llama")
    model = get_peft_model(base, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    result = export_model(model.eval(), tok, tmp_path / "m", "merged", verbose=False)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "m", local_files_only=True)
    ref = logits(model, tok)
    assert rel_diff(logits(reloaded, tok), ref) <= result.parity["logit_bound"] and result.parity["ok"]


def test_parity_warns_beyond_the_bound():
    model, tok = tuned_llama()
    other, _ = load_model("tiny-llama")  # the base: differs from the tuned model
    with pytest.warns(ParityWarning, match=r"FAILED \(logit"):
        report = parity_report(model, other, tok, dtype=torch.float32, label="test")
    assert not report["ok"] and "logit" in report["failed"]


def test_missing_tokenizer_is_a_clear_error(tmp_path):
    model, _ = tuned_llama()
    with pytest.raises(ValueError, match="needs the model's tokenizer"):
        export_model(model, None, tmp_path / "m", "merged")
    assert not (tmp_path / "m").exists() and no_leftovers(tmp_path / "m")


def test_unwritable_destination(tmp_path):
    model, tok = tuned_llama()
    blocker = tmp_path / "file.txt"
    blocker.write_text("x")
    with pytest.raises(ValueError, match="is a file"):
        export_model(model, tok, blocker / "sub" / "m", "merged")
    with pytest.raises(ValueError, match="not a folder"):
        export_model(model, tok, blocker, "merged")
    with pytest.raises(ValueError, match="format must be one of"):
        export_model(model, tok, tmp_path / "x", "onnx")


def test_failed_export_leaves_nothing_and_keeps_old(tmp_path, monkeypatch):
    model, tok = tuned_llama()
    out = tmp_path / "m"
    out.mkdir()
    (out / "keep.txt").write_text("old export")

    def boom(*args, **kwargs):
        raise RuntimeError("reload failed")

    monkeypatch.setattr(export_mod, "parity_report", boom)
    with pytest.raises(RuntimeError, match="reload failed"):
        export_model(model, tok, out, "merged", force=True)
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"] and no_leftovers(out)


def test_a_non_empty_folder_that_is_not_an_earlier_export_is_refused(tmp_path):
    """`export --out DIR` silently replaced a folder of user notes and data."""
    model, tok = tuned_llama()
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("my notes")
    with pytest.raises(
        ValueError, match=r"is not empty and it is not an earlier export.*notes\.txt.*--force"
    ):
        export_model(model, tok, out, "peft", verbose=False)
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"] and no_leftovers(out)

    fresh = tmp_path / "export"
    first = export_model(model, tok, fresh, "peft", verbose=False)
    assert export_mod.MANIFEST in first.files
    assert json.loads((fresh / export_mod.MANIFEST).read_text())["files"] == first.files
    export_model(model, tok, fresh, "peft", verbose=False)  # an earlier export of ours is replaced
    (fresh / "notes.txt").write_text("added later")
    with pytest.raises(ValueError, match=r"holds entries the earlier export did not write: notes\.txt"):
        export_model(model, tok, fresh, "peft", verbose=False)
    assert (fresh / "notes.txt").read_text() == "added later"

    forced = export_model(model, tok, out, "peft", verbose=False, force=True)
    assert "notes.txt" not in forced.files and not (out / "notes.txt").exists()


@pytest.mark.parametrize("mask", [0o022, 0o027], ids=["umask022", "umask027"])
def test_exported_files_get_the_usual_modes_under_the_umask(tmp_path, mask):
    """The merged folder's model.safetensors was 0600 while the rest was 0644."""
    model, tok = tuned_llama()
    old = os.umask(mask)
    try:
        result = export_model(model, tok, tmp_path / "merged", "merged", verbose=False)
    finally:
        os.umask(old)
    modes = {name: stat.S_IMODE((result.path / name).stat().st_mode) for name in result.files}
    assert "model.safetensors" in modes
    assert modes == dict.fromkeys(result.files, 0o666 & ~mask)
    assert stat.S_IMODE(result.path.stat().st_mode) == 0o777 & ~mask


@pytest.mark.parametrize(
    "error",
    [
        OSError(errno.ENOSPC, "No space left on device", "model.safetensors"),
        SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)"),
    ],
    ids=["oserror", "safetensors"],
)
def test_a_full_disk_is_one_clear_error_and_keeps_the_previous_export(tmp_path, monkeypatch, error):
    """A full disk during export gave a raw traceback (safetensors reports it as SafetensorError)."""
    model, tok = tuned_llama()
    out = tmp_path / "merged"
    export_model(model, tok, out, "merged", verbose=False)
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    def full_disk(tensors, filename, *args, **kwargs):
        with open(filename, "wb") as fh:
            fh.write(b"half a shard")
        raise error

    monkeypatch.setattr(modeling_utils, "safe_save_file", full_disk)
    with pytest.raises(ValueError, match="not enough disk space") as info:
        export_model(model, tok, out, "merged", verbose=False)
    message = str(info.value)
    assert str(out) in message and "--out" in message and "Free some space" in message
    needed = sum(p.numel() * p.element_size() for n, p in model.named_parameters() if "lora_" not in n)
    assert f"{needed:,} bytes" in message and "\n" not in message
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before and no_leftovers(out)
