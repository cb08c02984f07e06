"""Adapters that survive mistakes: crash-safe saves, PEFT scaling on load, corruption checks, seq-cls heads, all-or-nothing injection,
malformed configs, and merge_and_unload of a bare layer."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import peft
import pytest
import torch
from safetensors.torch import load_file, save_file
from testutil import rel_err
from torch import nn

from runlora_nb import RunLoRALinear
from runlora_nb.assets.zoo import load_model
from runlora_nb.integrations import adapters
from runlora_nb.integrations.adapter_files import HASH_KEY
from runlora_nb.integrations.adapters import AdapterError, load_adapter, save_adapter
from runlora_nb.integrations.inject import apply_runlora, get_peft_model, merge_and_unload, runlora_layers


def fresh(name="tiny-llama", task="causal-lm"):
    return load_model(name, task=task)[0].eval()


def data(n=2, length=10):
    ids = torch.randint(3, 200, (n, length), generator=torch.Generator().manual_seed(1))
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def trained(alpha=8):
    return apply_runlora(fresh(), r=4, alpha=alpha, init_lora_weights=False).eval()


def logits(model):
    with torch.no_grad():
        return model(**data()).logits


def shape(model):
    return (
        list(model.state_dict()),
        [type(m) for m in model.modules()],
        [p.requires_grad for p in model.parameters()],
    )


# ----------------------------------------------------------------------------------------- a failed save


def test_failed_save_leaves_the_previous_folder_whole(tmp_path, monkeypatch):
    out = tmp_path / "adapter"
    model = trained(alpha=8)
    save_adapter(model, out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    (out / "tokenizer.json").write_text("{}")  # a foreign file survives saves
    with torch.no_grad():
        next(iter(runlora_layers(model)))[1].lora_B.weight.add_(1)
    model.runlora_config.alpha = 32

    def boom(*a, **k):
        raise RuntimeError("killed between weights and config")

    monkeypatch.setattr(adapters, "_peft_config_dict", boom)
    with pytest.raises(RuntimeError, match="killed"):
        save_adapter(model, out)
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.name in before} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]  # no temp / aside sibling left
    assert json.loads((out / "adapter_config.json").read_text())["lora_alpha"] == 8
    loaded = load_adapter(fresh(), out)
    assert next(iter(runlora_layers(loaded)))[1].scaling == 2.0
    monkeypatch.undo()
    save_adapter(model, out)
    assert json.loads((out / "adapter_config.json").read_text())["lora_alpha"] == 32
    assert (out / "tokenizer.json").read_text() == "{}"


def test_kill_between_the_renames_loads_the_old_adapter(tmp_path):
    out = tmp_path / "adapter"
    save_adapter(trained(alpha=8), out)
    script = textwrap.dedent(f"""
        import os, signal
        from runlora_nb.assets.zoo import load_model
        from runlora_nb.integrations.adapters import save_adapter
        from runlora_nb.integrations.inject import apply_runlora
        model = apply_runlora(load_model("tiny-llama")[0], r=4, alpha=32, init_lora_weights=False)
        real = os.rename
        def rename(a, b):
            real(a, b)
            os.kill(os.getpid(), signal.SIGKILL)  # after "old folder renamed aside", before "new renamed in"
        os.rename = rename
        save_adapter(model, {str(out)!r})
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, timeout=300)
    assert proc.returncode == -9, proc.stderr.decode()[-2000:]
    assert not out.exists()
    with pytest.warns(UserWarning, match="interrupted"):
        loaded = load_adapter(fresh(), out)
    assert next(iter(runlora_layers(loaded)))[1].scaling == 2.0  # the old adapter, whole
    save_adapter(trained(alpha=16), out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]
    assert json.loads((out / "adapter_config.json").read_text())["lora_alpha"] == 16


# ------------------------------------------------------------------------------------------ PEFT scaling on load


def test_load_into_peft_model_adopts_the_files_alpha(tmp_path):
    targets = ["q_proj", "o_proj"]
    torch.manual_seed(3)
    src = get_peft_model(
        fresh(), peft.LoraConfig(r=4, lora_alpha=16, target_modules=targets, init_lora_weights=False)
    )
    src.save_pretrained(tmp_path)
    target = get_peft_model(fresh(), peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets)).eval()
    load_adapter(target, tmp_path)
    ref = peft.PeftModel.from_pretrained(fresh(), tmp_path).eval()
    layer = target.base_model.model.model.layers[0].self_attn.q_proj
    assert layer.scaling["default"] == 4.0 and target.peft_config["default"].lora_alpha == 16
    assert rel_err(logits(target), logits(ref)) < 1e-6


# ----------------------------------------------------------------------------------------------- corrupt files


def test_overwritten_bytes_fail_the_checksum(tmp_path):
    save_adapter(trained(), tmp_path)
    path = tmp_path / "adapter_model.safetensors"
    raw = bytearray(path.read_bytes())
    raw[-64:] = b"\xff" * 64
    path.write_bytes(bytes(raw))
    with pytest.raises(AdapterError, match=r"adapter_model\.safetensors is corrupt: its SHA-256 .*Re-save"):
        load_adapter(fresh(), tmp_path)
    assert peft.PeftModel.from_pretrained(fresh(), tmp_path) is not None  # PEFT ignores the metadata


def test_non_finite_tensors_are_refused_without_a_checksum(tmp_path):
    save_adapter(trained(), tmp_path)
    path = tmp_path / "adapter_model.safetensors"
    tensors = load_file(path)
    key = sorted(tensors)[0]
    tensors[key][0, 0] = float("nan")
    save_file(tensors, path)  # no runlora checksum: as a PEFT-written file
    model = fresh()
    keys = list(model.state_dict())
    with pytest.raises(AdapterError, match=rf"tensor {key.replace('.', '[.]')} holds 1 NaN/inf .*re-train"):
        load_adapter(model, tmp_path)
    assert list(model.state_dict()) == keys


def test_peft_written_folder_has_no_checksum_and_loads(tmp_path):
    pm = get_peft_model(fresh(), peft.LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights=False))
    pm.save_pretrained(tmp_path)
    from safetensors import safe_open

    with safe_open(tmp_path / "adapter_model.safetensors", "pt") as fh:
        assert HASH_KEY not in (fh.metadata() or {})
    assert rel_err(logits(load_adapter(fresh(), tmp_path)), logits(pm.eval())) < 1e-6
    save_adapter(pm, tmp_path / "again")  # a PEFT model saved by us gets the checksum too
    with safe_open(tmp_path / "again" / "adapter_model.safetensors", "pt") as fh:
        assert HASH_KEY in fh.metadata()


# -------------------------------------------------------------------------------------------- seq-cls heads


def test_peft_seq_cls_adapter_loads_with_its_head(tmp_path):
    task = "sequence-classification"
    torch.manual_seed(5)
    cfg = peft.LoraConfig(
        task_type="SEQ_CLS", r=4, lora_alpha=8, target_modules=["query", "value"], init_lora_weights=False
    )
    pm = get_peft_model(fresh("tiny-roberta", task), cfg).eval()
    with torch.no_grad():
        for p in pm.base_model.model.classifier.modules_to_save["default"].parameters():
            p.add_(0.5)  # a trained head differs from the fresh one
    pm.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())["modules_to_save"]
    assert {"classifier", "score"} <= set(saved)  # PEFT's defaults for the task; newer PEFT names more heads
    model = load_adapter(fresh("tiny-roberta", task), tmp_path)
    assert rel_err(logits(model), logits(pm)) < 1e-6
    target = get_peft_model(fresh("tiny-roberta", task), cfg).eval()  # and into a PEFT model with the wrapper
    assert rel_err(logits(load_adapter(target, tmp_path)), logits(pm)) < 1e-6


# --------------------------------------------------------------------------------------- injection: all or nothing


def test_failed_apply_leaves_the_model_unchanged_and_retry_works():
    model = fresh()
    before = shape(model)
    with pytest.raises(ValueError, match=r"modules_to_save names \['lm_haed'\].*lm_head"):
        apply_runlora(model, r=4, modules_to_save=["lm_haed"])
    assert shape(model) == before and not hasattr(model, "runlora_config")
    apply_runlora(model, r=4, modules_to_save=["lm_head"])
    assert model.lm_head.weight.requires_grad and any(True for _ in runlora_layers(model))


def test_failed_load_leaves_the_model_unchanged_and_retry_works(tmp_path):
    good = trained()
    save_adapter(good, tmp_path / "good")
    save_adapter(trained(), tmp_path / "bad")
    tensors = load_file(tmp_path / "bad" / "adapter_model.safetensors")
    tensors.pop(sorted(tensors)[0])
    save_file(tensors, tmp_path / "bad" / "adapter_model.safetensors")
    model = fresh()
    before = shape(model)
    with pytest.raises(AdapterError, match="missing in file"):
        load_adapter(model, tmp_path / "bad")
    assert shape(model) == before and not hasattr(model, "runlora_config")
    assert rel_err(logits(load_adapter(model, tmp_path / "good")), logits(good)) < 1e-6


# ------------------------------------------------------------------------------------------- malformed configs


@pytest.mark.parametrize(
    ("edit", "match"),
    [
        (lambda c: [c], r"holds a JSON list, not an object"),
        (lambda c: {k: v for k, v in c.items() if k != "r"}, r"has no field 'r'"),
        (lambda c: {**c, "r": "eight"}, r"field 'r' is 'eight'; it must be a positive integer"),
        (lambda c: {**c, "lora_alpha": "big"}, r"field 'lora_alpha' is 'big'; it must be a finite number"),
        (lambda c: {**c, "target_modules": 3}, r"field 'target_modules' is 3"),
    ],
    ids=["list", "no-r", "r-text", "alpha-text", "targets-int"],
)
def test_malformed_config_names_file_field_and_fix(tmp_path, edit, match):
    save_adapter(trained(), tmp_path)
    path = tmp_path / "adapter_config.json"
    path.write_text(json.dumps(edit(json.loads(path.read_text()))))
    with pytest.raises(AdapterError, match=match) as err:
        load_adapter(fresh(), tmp_path)
    assert "adapter_config.json" in str(err.value) and "re-save" in str(err.value).lower()


# ----------------------------------------------------------------------------------------- merging a bare layer


def test_merge_and_unload_of_a_bare_layer_returns_the_merged_linear():
    torch.manual_seed(0)
    layer = RunLoRALinear(nn.Linear(16, 8), r=4, alpha=8, init_lora_weights=False)
    x = torch.randn(3, 16)
    with torch.no_grad():
        want = layer(x)
    merged = merge_and_unload(layer)
    assert type(merged) is nn.Linear
    with torch.no_grad():
        assert rel_err(merged(x), want) < 1e-6


def test_a_half_written_temp_sibling_is_ignored_by_load_and_cleaned_by_save(tmp_path):
    out = tmp_path / "adapter"
    save_adapter(trained(alpha=8), out)
    half = tmp_path / ".adapter.runlora-new-crashed"
    half.mkdir()
    (half / "adapter_model.safetensors").write_bytes(b"\xff" * 10)  # a save killed while writing
    assert next(iter(runlora_layers(load_adapter(fresh(), out))))[1].scaling == 2.0
    save_adapter(trained(alpha=16), out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]
