"""Adapter GGUF: llama.cpp's adapter keys and shapes, base GGUF + adapter == merged GGUF, a check that can fail."""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch

from runlora_nb.assess.export import export_model
from runlora_nb.assess.gguf_adapter import adapter_modelfile_text, check_adapter_gguf
from runlora_nb.assets.tiny import TINY_DIMS, build_tiny
from runlora_nb.assets.tokenizer import byte_tokenizer
from runlora_nb.assets.zoo import load_model
from runlora_nb.integrations.inject import apply_runlora, runlora_layers


def with_adapters(model, r: int = 4, **kw):
    """Non-zero RunLoRA adapters on every linear layer (B random: the delta is not zero)."""
    apply_runlora(model, r=r, alpha=2 * r, target_modules="all-linear", **kw)
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for _, layer in runlora_layers(model):
            layer.lora_B.weight.copy_(torch.randn(layer.lora_B.weight.shape, generator=gen) * 0.05)
    return model.eval()


def tensors_of(path) -> dict[str, gguf.ReaderTensor]:
    return {t.name: t for t in gguf.GGUFReader(path).tensors}


def field(path, key):
    return gguf.GGUFReader(path).fields[key].contents()


def assert_base_plus_adapter_is_merged(base_path, adapter_path, merged_path, rtol: float) -> int:
    """What llama.cpp computes, written out independently of the exporter: for every pair,
    ``W_base + alpha / r · B·A`` (``lora_a`` ne = [in, r], ``lora_b`` ne = [r, out]) equals the merged
    GGUF's tensor, q/k permutation included."""
    base, merged, lora = tensors_of(base_path), tensors_of(merged_path), tensors_of(adapter_path)
    alpha = field(adapter_path, "adapter.lora.alpha")
    names = sorted(n.removesuffix(".lora_a") for n in lora if n.endswith(".lora_a"))
    for name in names:
        a, b = lora[name + ".lora_a"], lora[name + ".lora_b"]
        w = base[name]
        assert int(a.shape[0]) == int(w.shape[0]) and int(b.shape[1]) == int(w.shape[1])  # loader's ne checks
        assert int(a.shape[1]) == int(b.shape[0])  # r
        rank = int(b.shape[0])
        delta = alpha / rank * (np.asarray(b.data, np.float64) @ np.asarray(a.data, np.float64))
        got = np.asarray(w.data, np.float64) + delta
        want = np.asarray(merged[name].data, np.float64)
        assert np.linalg.norm(got - want) <= rtol * np.linalg.norm(want), name
        assert np.linalg.norm(delta) > 100 * rtol * np.linalg.norm(want), name  # the adapter matters
    return len(names)


def test_adapter_gguf_keys_shapes_and_base_plus_adapter_equals_merged(tmp_path):
    model, tok = load_model("tiny-llama")
    model = with_adapters(model)
    result = export_model(model, tok, tmp_path / "a", "gguf-adapter", dtype="f32", verbose=False)
    folder = tmp_path / "a"
    assert {"adapter.gguf", "base.gguf", "Modelfile", "parity.json"} <= set(result.files)
    assert result.parity["ok"] and result.parity["max_rel_diff"] <= result.parity["bound"]
    path = folder / "adapter.gguf"
    assert field(path, "general.type") == "adapter"
    assert field(path, "general.architecture") == "llama"
    assert field(path, "adapter.type") == "lora"
    assert field(path, "adapter.lora.alpha") == pytest.approx(8.0)
    lora = tensors_of(path)
    config = model.config
    assert [int(n) for n in lora["blk.0.attn_q.weight.lora_a"].shape] == [config.hidden_size, 4]
    assert [int(n) for n in lora["blk.1.ffn_down.weight.lora_b"].shape] == [4, config.hidden_size]
    assert lora["blk.0.attn_k.weight.lora_b"].tensor_type.name == "F32"
    assert (folder / "Modelfile").read_text() == "FROM ./base.gguf\nADAPTER ./adapter.gguf\n"

    export_model(model, tok, tmp_path / "m", "gguf", dtype="f32", verbose=False)
    n = assert_base_plus_adapter_is_merged(folder / "base.gguf", path, tmp_path / "m" / "model.gguf", 1e-5)
    assert n == 7 * config.num_hidden_layers


def test_adapter_gguf_gqa_rslora_and_a_given_base(tmp_path):
    """k with fewer kv heads permuted per kv head, rsLoRA's alpha/√r scale carried by alpha = s·r."""
    dims = {**TINY_DIMS, "kv_heads": 2, "tie": True}
    model = with_adapters(build_tiny("llama", "causal-lm", 2, dims), use_rslora=True)
    tok = byte_tokenizer()
    export_model(model, tok, tmp_path / "m", "gguf", dtype="f32", verbose=False)
    export_model(model, tok, tmp_path / "b", "gguf-adapter", dtype="f32", verbose=False)
    path = tmp_path / "b" / "adapter.gguf"
    assert field(path, "adapter.lora.alpha") == pytest.approx(8 / 2 * 4)  # s = 8/√4, r = 4
    assert_base_plus_adapter_is_merged(
        tmp_path / "b" / "base.gguf", path, tmp_path / "m" / "model.gguf", 1e-5
    )

    result = export_model(
        model, None, tmp_path / "c", "gguf-adapter", dtype="f32", verbose=False, base_gguf="/m/base.gguf"
    )
    assert "base.gguf" not in result.files and result.parity["ok"]
    assert (tmp_path / "c" / "Modelfile").read_text() == adapter_modelfile_text("/m/base.gguf")


def test_adapter_gguf_of_a_peft_model(tmp_path):
    import peft

    model, tok = load_model("tiny-llama")
    config = peft.LoraConfig(r=4, lora_alpha=16, target_modules=["q_proj", "k_proj", "down_proj"])
    model = peft.get_peft_model(model, config)
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
    export_model(model, tok, tmp_path / "m", "gguf", dtype="f32", verbose=False)
    result = export_model(model, tok, tmp_path / "a", "gguf-adapter", dtype="f32", verbose=False)
    assert result.parity["ok"] and result.parity["modules"] == 3 * model.config.num_hidden_layers
    assert field(tmp_path / "a" / "adapter.gguf", "adapter.lora.alpha") == pytest.approx(16.0)
    assert_base_plus_adapter_is_merged(
        tmp_path / "a" / "base.gguf", tmp_path / "a" / "adapter.gguf", tmp_path / "m" / "model.gguf", 1e-5
    )


def test_adapter_gguf_f16_passes_within_its_bound_and_a_sabotaged_tensor_fails(tmp_path):
    model, tok = load_model("tiny-llama")
    model = with_adapters(model)
    result = export_model(model, tok, tmp_path / "a", "gguf-adapter", dtype="f16", verbose=False)
    path = tmp_path / "a" / "adapter.gguf"
    assert result.parity["ok"] and 0 < result.parity["max_rel_diff"] <= result.parity["bound"] < 0.02
    assert tensors_of(path)["blk.0.attn_q.weight.lora_a"].tensor_type.name == "F16"

    reader = gguf.GGUFReader(path, "r+")  # one tensor 2% off, in place
    target = next(t for t in reader.tensors if t.name == "blk.1.attn_v.weight.lora_b")
    target.data[...] = target.data * np.float16(1.02)
    del reader
    report = check_adapter_gguf(path, model, "f16")
    assert not report["ok"] and report["failed"] == ["blk.1.attn_v.weight"]


def test_adapter_gguf_refusals_write_nothing(tmp_path):
    model, tok = load_model("tiny-llama")
    with pytest.raises(ValueError, match="dtype must be one of f32, f16"):
        export_model(with_adapters(model), tok, tmp_path / "x", "gguf-adapter", dtype="bf16", verbose=False)
    base, _ = load_model("tiny-llama")
    with pytest.raises(ValueError, match="has no LoRA layers"):
        export_model(base, tok, tmp_path / "x", "gguf-adapter", dtype="f32", verbose=False)
    gpt2 = with_adapters(build_tiny("gpt2", "causal-lm", 2))
    with pytest.raises(ValueError, match="GPT2LMHeadModel is not supported"):
        export_model(gpt2, byte_tokenizer(), tmp_path / "x", "gguf-adapter", dtype="f32", verbose=False)
    assert not (tmp_path / "x").exists()


def test_adapter_gguf_refuses_a_tied_lm_head_and_two_active_adapters(tmp_path):
    import peft

    model = build_tiny("llama", "causal-lm", 2, {**TINY_DIMS, "tie": True})
    apply_runlora(model, r=4, target_modules=["q_proj", "lm_head"])
    with pytest.raises(ValueError, match="lm_head, whose weight is tied"):
        export_model(model, byte_tokenizer(), tmp_path / "x", "gguf-adapter", dtype="f32", verbose=False)
    base, tok = load_model("tiny-llama")
    two = peft.get_peft_model(base, peft.LoraConfig(r=4, target_modules=["q_proj"]), adapter_name="one")
    two.add_adapter("two", peft.LoraConfig(r=4, target_modules=["q_proj"]))
    two.base_model.set_adapter(["one", "two"])
    with pytest.raises(ValueError, match="Activate exactly one"):
        export_model(two, tok, tmp_path / "x", "gguf-adapter", dtype="f32", verbose=False)
    assert not (tmp_path / "x").exists()
