"""apply_runlora, from_peft and merge_and_unload on small random-init models of each architecture."""

from __future__ import annotations

import warnings

import peft
import pytest
import torch
from testutil import rel_err
from transformers.pytorch_utils import Conv1D

from runlora_nb import RunLoRALinear
from runlora_nb.assets.zoo import load_model
from runlora_nb.common.numerics import rounding_bound
from runlora_nb.integrations.inject import (
    apply_runlora,
    find_targets,
    from_peft,
    get_peft_model,
    merge_and_unload,
    runlora_layers,
    trainable_parameters,
)

TINY = ["tiny-llama", "tiny-opt", "tiny-gpt2", "tiny-roberta"]


def tiny(name: str, task: str = "causal-lm", **kw):
    model, tok = load_model(name, task=task, **kw)
    return model.train(), tok


def batch(tok, n: int = 2, length: int = 12):
    ids = torch.randint(3, 200, (n, length), generator=torch.Generator().manual_seed(0))
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}


@pytest.mark.parametrize("name", TINY)
def test_apply_runlora_matches_peft_targets_and_freezes_the_rest(name):
    model, _tok = tiny(name)
    reference, _ = tiny(name)
    pm = get_peft_model(reference, peft.LoraConfig(r=4, lora_alpha=8))
    peft_targets = sorted(n.removeprefix("base_model.model.") for n, m in pm.named_modules()
                          if isinstance(m, peft.tuners.lora.LoraLayer))  # fmt: skip
    apply_runlora(model, r=4, alpha=8)
    ours = sorted(n for n, _ in runlora_layers(model))
    assert ours == peft_targets and ours  # PEFT's default targets per architecture
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    counts = trainable_parameters(model)
    assert counts.trainable == sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert str(counts).startswith("trainable params: ") and "trainable%" in str(counts)
    assert counts.trainable == trainable_parameters(pm).trainable


@pytest.mark.parametrize("name", TINY)
def test_all_linear_and_training_step(name):
    model, tok = tiny(name)
    apply_runlora(model, r=4, alpha=8, target_modules="all-linear", dropout=0.1)
    names = [n for n, _ in runlora_layers(model)]
    head = model.get_output_embeddings()
    assert all(model.get_submodule(n).base_layer is not head for n in names)  # lm_head left out
    if name == "tiny-gpt2":
        assert all(isinstance(model.get_submodule(n).base_layer, Conv1D) for n in names)
        assert model.runlora_config.fan_in_fan_out
    loss = model(**batch(tok)).loss
    loss.backward()
    grads = [model.get_submodule(n).lora_A.weight.grad for n in names]
    assert all(g is not None for g in grads)


def test_target_rules_follow_peft():
    model, _ = tiny("tiny-llama")
    assert find_targets(model, ["q_proj"]) == [
        "model.layers.0.self_attn.q_proj",
        "model.layers.1.self_attn.q_proj",
    ]
    assert find_targets(model, r".*\.1\.mlp\.(up|down)_proj") == [
        "model.layers.1.mlp.up_proj",
        "model.layers.1.mlp.down_proj",
    ]
    assert find_targets(model, ["model.layers.0.self_attn.v_proj"]) == ["model.layers.0.self_attn.v_proj"]
    assert "model.layers.0.mlp.up_proj" not in find_targets(model, "all-linear", exclude_modules=["up_proj"])
    with pytest.raises(ValueError, match=r"matches no linear layer.*'q_proj'"):
        find_targets(model, ["query"])


@pytest.mark.parametrize("targets", [["q_proj", "nope"], ("nope", "v_proj", "q_prj")])
def test_unknown_target_names_are_refused_with_the_valid_ones(targets):
    model, _ = tiny("tiny-llama")
    unknown = [t for t in targets if t not in ("q_proj", "v_proj")]
    with pytest.raises(
        ValueError, match=r"apply_runlora: target_modules name\(s\) (.+) match no linear layer"
    ) as exc:
        apply_runlora(model, r=4, target_modules=targets)
    msg = str(exc.value)
    assert str(unknown) in msg and "'q_proj'" in msg and "'down_proj'" in msg
    assert not list(runlora_layers(model))  # nothing was wrapped
    apply_runlora(model, r=4, target_modules=["q_proj", "model.layers.0.mlp.up_proj"])  # paths and leaves
    assert len(list(runlora_layers(model))) == 3


def test_finetune_config_unknown_targets_are_refused_on_both_backends(tmp_path):
    from runlora_nb.train import FineTuneConfig, FineTuner

    for backend in ("runlora", "peft"):
        cfg = FineTuneConfig(model="tiny-llama", backend=backend, targets=["q_proj", "nope"], steps=1, seq_len=16,
                             sample_prompts=(), runs_dir=str(tmp_path))  # fmt: skip
        with pytest.raises(ValueError, match=r"\['nope'\] match no linear layer"):
            FineTuner(cfg).run()


def test_a_rank_no_target_can_use_is_refused_before_allocating(monkeypatch):
    from runlora_nb.nn import layer as layer_module

    model, _ = tiny("tiny-llama")  # every linear layer has min(in, out) = 128
    with pytest.raises(
        ValueError, match=r"r=100000 exceeds min\(in_features, out_features\) of every"
    ) as exc:
        apply_runlora(model, r=100000, target_modules="all-linear")
    assert "1.62 GiB" in str(exc.value) and "use r <= 128" in str(exc.value)
    assert not list(runlora_layers(model))
    # above some layers' min(in, out) but not all: allowed (the layer warns once, as PEFT allows it)
    monkeypatch.setattr(layer_module, "_RANK_WARNED", set())
    mixed = torch.nn.Sequential(torch.nn.Linear(8, 4), torch.nn.Linear(64, 32))
    with pytest.warns(UserWarning, match="exceeds min"):
        apply_runlora(mixed, r=16, target_modules=["0", "1"])
    with pytest.raises(ValueError, match=r"largest is 32, 1\).*use r <= 32"):
        apply_runlora(torch.nn.Sequential(torch.nn.Linear(8, 4), torch.nn.Linear(64, 32)), r=33,
                      target_modules=["0", "1"])  # fmt: skip


def test_finetune_config_rank_above_every_target_is_refused_on_both_backends(tmp_path):
    from runlora_nb.train import FineTuneConfig, FineTuner

    for backend in ("runlora", "peft"):
        cfg = FineTuneConfig(model="tiny-llama", backend=backend, r=100000, steps=1, seq_len=16,
                             sample_prompts=(), runs_dir=str(tmp_path))  # fmt: skip
        with pytest.raises(ValueError, match=r"r=100000 exceeds .* GiB"):
            FineTuner(cfg).run()


def test_sequence_classification_keeps_the_head_trainable():
    model, _tok = tiny("tiny-roberta", task="sequence-classification")
    apply_runlora(model, r=4, alpha=8, target_modules="all-linear")
    assert model.runlora_config.modules_to_save == ["classifier"]
    assert all(not n.startswith("classifier") for n, _ in runlora_layers(model))
    assert all(p.requires_grad for p in model.classifier.parameters())


def test_apply_twice_and_bad_arguments_are_errors():
    model, _ = tiny("tiny-llama")
    with pytest.raises(ValueError, match="dropout must be in"):
        apply_runlora(model, dropout=1.5)
    with pytest.raises(ValueError, match="not a planner mode"):
        apply_runlora(model, chain="quickest")
    apply_runlora(model)
    with pytest.raises(ValueError, match="already has RunLoRA layers"):
        apply_runlora(model)


# ---------------------------------------------------------------------------------------------- from_peft


def logits_bound(model, extra_per_layer: int = 0) -> float:
    """fp32 rounding bound of a tiny model's logits: k = its widest reduction, depth = the matmuls in series
    (attention in/out and mlp in/out per layer, then the head), plus ``extra_per_layer`` roundings per layer (e.g.
    W + sAB when merging)."""
    cfg = model.config
    widths = ("hidden_size", "intermediate_size", "ffn_dim", "n_inner", "n_embd")
    k = max(getattr(cfg, a, 0) or 0 for a in widths)
    layers = getattr(cfg, "num_hidden_layers", None) or cfg.n_layer
    return rounding_bound(torch.float32, k, (4 + extra_per_layer) * layers + 1)


def peft_model(name="tiny-llama", init=False, **cfg):
    model, tok = tiny(name)
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=init, **cfg)
    return get_peft_model(model, config).train(), tok


@pytest.mark.parametrize("name", TINY)
def test_from_peft_output_equals_peft_and_shares_tensors(name):
    pm, tok = peft_model(name)
    data = batch(tok)
    pm.eval()
    with torch.no_grad():
        expected = pm(**data).logits
    params_before = {n: p.data_ptr() for n, p in pm.named_parameters()}
    from_peft(pm)
    assert {n: p.data_ptr() for n, p in pm.named_parameters()} == params_before  # shared, not copied
    converted = list(runlora_layers(pm))
    assert converted and all(isinstance(layer, peft.tuners.lora.LoraLayer) for _, layer in converted)
    with torch.no_grad():
        got = pm(**data).logits
    # Integration, not rounding: the two sides sum the same products in different orders (fwd1's addmm vs PEFT's
    # base + lora), so each is within the rounding bound of the exact logits (k = the widest reduction, depth =
    # the matmuls in series) and they are within twice that of each other (docs/numerics.md).
    assert rel_err(got, expected) <= 2 * logits_bound(pm)
    pm.train()
    loss = pm(**data).loss
    loss.backward()
    assert all(layer.lora_A["default"].weight.grad is not None for _, layer in converted)


def test_from_peft_keeps_peft_features_working(tmp_path):
    pm, tok = peft_model()
    from_peft(pm)
    data = batch(tok)
    pm.eval()
    with torch.no_grad():
        with pm.disable_adapter():
            base = pm(**data).logits
        adapted = pm(**data).logits
        assert not torch.allclose(base, adapted)
        pm.save_pretrained(tmp_path)  # PEFT's own save still finds the (converted) LoRA layers
        reloaded = peft.PeftModel.from_pretrained(tiny("tiny-llama")[0], tmp_path).eval()
        assert rel_err(reloaded(**data).logits, adapted) <= 2 * logits_bound(pm)


def test_from_peft_merge_and_unload():
    pm, tok = peft_model()
    from_peft(pm)
    data = batch(tok)
    pm.eval()
    with torch.no_grad():
        before = pm(**data).logits
        merged = merge_and_unload(pm)
        assert not list(runlora_layers(merged))
        assert rel_err(merged(**data).logits, before) <= 2 * logits_bound(merged, extra_per_layer=4)


@pytest.mark.parametrize(
    ("cfg", "match"),
    [
        ({"use_dora": True}, "DoRA"),
        ({"lora_bias": True}, "lora_bias"),
    ],
)
def test_from_peft_refuses_unsupported_features(cfg, match):
    pm, _ = peft_model(**cfg)
    with pytest.raises(ValueError, match=rf"nothing was converted[\s\S]*{match}"):
        from_peft(pm)
    assert not list(runlora_layers(pm))


def test_from_peft_refuses_several_active_adapters():
    pm, _ = peft_model()
    pm.add_adapter("second", peft.LoraConfig(r=4, target_modules="all-linear"))
    pm.base_model.set_adapter(["default", "second"])
    with pytest.raises(ValueError, match="several active adapters"):
        from_peft(pm)


def test_from_peft_needs_lora_layers():
    model, _ = tiny("tiny-llama")
    with pytest.raises(ValueError, match="has no PEFT LoRA layers"):
        from_peft(model)


# ---------------------------------------------------------------------------------------------- merge


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-gpt2"])
def test_merge_and_unload_restores_plain_layers(name):
    model, tok = tiny(name)
    apply_runlora(model, r=4, alpha=8, target_modules="all-linear", init_lora_weights=False)
    data = batch(tok)
    model.eval()
    with torch.no_grad():
        before = model(**data).logits
        merge_and_unload(model)
        assert not list(runlora_layers(model))
        assert not any(isinstance(m, RunLoRALinear) for m in model.modules())
        assert rel_err(model(**data).logits, before) <= 2 * logits_bound(model, extra_per_layer=4)


def test_layers_merge_and_unmerge_in_place():
    model, tok = tiny("tiny-llama")
    apply_runlora(model, r=4, alpha=8, init_lora_weights=False)
    data = batch(tok)
    model.eval()
    with torch.no_grad():
        before = model(**data).logits
        for _, layer in runlora_layers(model):
            layer.merge()
        assert rel_err(model(**data).logits, before) <= 2 * logits_bound(model, extra_per_layer=4)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            for _, layer in runlora_layers(model):
                layer.unmerge()
        assert rel_err(model(**data).logits, before) <= 2 * logits_bound(model, extra_per_layer=4)
