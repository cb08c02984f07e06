"""PEFT-format adapters: runlora_nb save → PEFT load, PEFT save → runlora_nb load, and every bad input."""

from __future__ import annotations

import json

import peft
import pytest
import torch
from safetensors.torch import load_file, save_file
from testutil import rel_err

from runlora_nb.assets.zoo import load_model
from runlora_nb.integrations.adapters import AdapterError, load_adapter, save_adapter
from runlora_nb.integrations.inject import apply_runlora, get_peft_model, runlora_layers


def fresh(name="tiny-llama", task="causal-lm"):
    model, _ = load_model(name, task=task)
    return model.eval()


def data(n=2, length=10):
    ids = torch.randint(3, 200, (n, length), generator=torch.Generator().manual_seed(1))
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def trained(name="tiny-llama", **kw):
    model = apply_runlora(fresh(name), r=4, alpha=8, init_lora_weights=False, **kw)
    return model.eval()


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-gpt2", "tiny-opt", "tiny-roberta"])
@pytest.mark.parametrize("targets", [None, "all-linear"])
def test_runlora_save_loads_in_peft_with_same_outputs(tmp_path, name, targets):
    model = trained(name, target_modules=targets)
    save_adapter(model, tmp_path)
    assert {p.name for p in tmp_path.iterdir()} == {"adapter_config.json", "adapter_model.safetensors"}
    keys = load_file(tmp_path / "adapter_model.safetensors").keys()
    assert all(
        k.startswith("base_model.model.") and k.endswith(("lora_A.weight", "lora_B.weight")) for k in keys
    )
    pm = peft.PeftModel.from_pretrained(fresh(name), tmp_path).eval()
    with torch.no_grad():
        assert rel_err(pm(**data()).logits, model(**data()).logits) < 1e-6


def test_classification_head_travels_with_the_adapter(tmp_path):
    base = fresh("tiny-roberta", "sequence-classification")
    model = apply_runlora(
        base, r=4, alpha=8, target_modules=["query", "value"], init_lora_weights=False
    ).eval()
    with torch.no_grad():
        model.classifier.out_proj.weight.add_(1.0)  # a trained head differs from the fresh one
    save_adapter(model, tmp_path)
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    assert cfg["modules_to_save"] == ["classifier"] and cfg["task_type"] == "SEQ_CLS"
    pm = peft.PeftModel.from_pretrained(fresh("tiny-roberta", "sequence-classification"), tmp_path).eval()
    with torch.no_grad():
        assert rel_err(pm(**data()).logits, model(**data()).logits) < 1e-6


def test_peft_save_loads_into_runlora(tmp_path):
    base = fresh()
    torch.manual_seed(3)
    pm = get_peft_model(
        base,
        peft.LoraConfig(r=4, lora_alpha=16, target_modules=["q_proj", "o_proj"], init_lora_weights=False),
    )
    pm.eval().save_pretrained(tmp_path)
    model = load_adapter(fresh(), tmp_path)  # no adapters yet: created from the saved config
    assert sorted(n for n, _ in runlora_layers(model)) == sorted(
        n.removeprefix("base_model.model.")
        for n, m in pm.named_modules()
        if isinstance(m, peft.tuners.lora.LoraLayer)
    )
    with torch.no_grad():
        assert rel_err(model.eval()(**data()).logits, pm(**data()).logits) < 1e-6
    # and into a model that already has matching adapters (alpha is adopted from the file)
    again = load_adapter(apply_runlora(fresh(), r=4, alpha=1, target_modules=["q_proj", "o_proj"]), tmp_path)
    with torch.no_grad():
        assert rel_err(again.eval()(**data()).logits, pm(**data()).logits) < 1e-6


def test_save_is_atomic_and_replaces(tmp_path):
    model = trained()
    save_adapter(model, tmp_path)
    first = (tmp_path / "adapter_model.safetensors").read_bytes()
    with torch.no_grad():
        next(iter(runlora_layers(model)))[1].lora_B.weight.add_(1)
    save_adapter(model, tmp_path)
    assert (tmp_path / "adapter_model.safetensors").read_bytes() != first
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporaries left


def test_save_needs_adapters(tmp_path):
    with pytest.raises(AdapterError, match="has no RunLoRA adapters"):
        save_adapter(fresh(), tmp_path)


def _snapshot(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}


def _assert_unchanged(model, snap):
    for n, p in model.named_parameters():
        if n in snap:
            assert torch.equal(p, snap[n]), f"{n} was partially loaded"


def _tamper(tmp_path, fn):
    path = tmp_path / "adapter_model.safetensors"
    tensors = load_file(path)
    fn(tensors)
    save_file(tensors, path)


@pytest.mark.parametrize(
    ("edit", "match"),
    [
        (
            lambda t: t.pop(next(k for k in sorted(t) if k.endswith("lora_B.weight"))),
            "missing in file: .*lora_B",
        ),
        (
            lambda t: t.update({"base_model.model.model.nowhere.lora_A.weight": torch.zeros(4, 4)}),
            "not in model: .*nowhere",
        ),
        (
            lambda t: t.update({k: torch.zeros(v.shape[0], v.shape[1] + 1) for k, v in list(t.items())[-1:]}),
            r"shape \(.*\) in file, \(.*\) in model",
        ),
    ],
    ids=["missing-key", "extra-key", "wrong-shape"],
)
def test_mismatches_name_the_module_and_load_nothing(tmp_path, edit, match):
    save_adapter(trained(), tmp_path)
    _tamper(tmp_path, edit)
    target = trained()
    snap = _snapshot(target)
    with pytest.raises(AdapterError, match=match):
        load_adapter(target, tmp_path)
    _assert_unchanged(target, snap)


def test_wrong_rank_is_reported(tmp_path):
    save_adapter(trained(), tmp_path)
    target = apply_runlora(fresh(), r=8, alpha=16)
    snap = _snapshot(target)
    with pytest.raises(
        AdapterError, match=r"model\.layers\.0\.self_attn\.q_proj: lora_A shape .*file has r=4, model has r=8"
    ):
        load_adapter(target, tmp_path)
    _assert_unchanged(target, snap)


def test_a_width_mismatch_names_the_tensor_and_the_widths_not_equal_ranks(tmp_path):
    save_adapter(trained(), tmp_path)
    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
    _tamper(tmp_path, lambda t: t.update({key: torch.zeros(4, 129)}))
    with pytest.raises(AdapterError) as exc:
        load_adapter(trained(), tmp_path)
    msg = str(exc.value)
    assert "model.layers.0.self_attn.q_proj: lora_A shape (4, 129) in file, (4, 128) in model" in msg
    assert "same r=4; the layer's in_features is 129 in file, 128 in model" in msg
    assert "file has r=" not in msg  # the ranks agree: saying "r=4 vs r=4" explained nothing


def test_a_run_folder_loads_its_adapter_subfolder_and_a_wrong_folder_hints_at_it(tmp_path):
    source = trained()
    save_adapter(source, tmp_path / "run" / "adapter")
    loaded = load_adapter(fresh(), tmp_path / "run")  # RUN_DIR, as `runs list` prints it
    x = data()
    with torch.no_grad():
        assert torch.equal(loaded(**x).logits, source(**x).logits)
    (tmp_path / "empty").mkdir()
    with pytest.raises(AdapterError, match=r"empty/adapter_config.json is missing.*RUN_DIR/adapter"):
        load_adapter(fresh(), tmp_path / "empty")


@pytest.mark.parametrize("damage", ["truncate", "garbage"])
def test_corrupt_or_truncated_file(tmp_path, damage):
    save_adapter(trained(), tmp_path)
    path = tmp_path / "adapter_model.safetensors"
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) // 2] if damage == "truncate" else b"\x00" * 64)
    target = trained()
    snap = _snapshot(target)
    with pytest.raises(AdapterError, match="corrupt or truncated"):
        load_adapter(target, tmp_path)
    _assert_unchanged(target, snap)


def test_missing_files_and_bad_config(tmp_path):
    with pytest.raises(AdapterError, match=r"adapter_config\.json is missing"):
        load_adapter(fresh(), tmp_path)
    save_adapter(trained(), tmp_path)
    (tmp_path / "adapter_config.json").write_text("{broken")
    with pytest.raises(AdapterError, match="not valid JSON"):
        load_adapter(fresh(), tmp_path)
    save_adapter(trained(), tmp_path)
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    cfg["use_dora"] = True
    (tmp_path / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(AdapterError, match="DoRA"):
        load_adapter(fresh(), tmp_path)
    cfg["use_dora"] = False
    (tmp_path / "adapter_config.json").write_text(json.dumps(cfg))
    (tmp_path / "adapter_model.safetensors").rename(tmp_path / "adapter_model.bin")
    with pytest.raises(AdapterError, match="safetensors only"):
        load_adapter(fresh(), tmp_path)
