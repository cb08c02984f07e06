"""GGUF export: llama.cpp layout read back by gguf's reader and by transformers, parity with the merged model."""

from __future__ import annotations

import warnings
from types import SimpleNamespace

import gguf
import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from runlora_nb.assess.export import export_model, merged_copy
from runlora_nb.assess.gguf_export import modelfile_text
from runlora_nb.assess.parity import ParityWarning
from runlora_nb.assets.tiny import TINY_DIMS, build_tiny
from runlora_nb.assets.tokenizer import byte_tokenizer
from runlora_nb.assets.zoo import load_model
from runlora_nb.common.numerics import rounding_bound
from runlora_nb.integrations.inject import apply_runlora, runlora_layers

PROMPT = "Shall I compare thee to a summer's day?"


def with_adapters(model, r: int = 4):
    """Non-zero RunLoRA adapters on every linear layer: the tuned model differs from its base."""
    apply_runlora(model, r=r, alpha=2 * r, target_modules="all-linear")
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for _, layer in runlora_layers(model):
            layer.lora_B.weight.copy_(torch.randn(layer.lora_B.weight.shape, generator=gen) * 0.05)
    return model.eval()


def expected_names(layers: int, tied: bool) -> set[str]:
    per_block = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")
    names = {"token_embd.weight", "output_norm.weight"} | ({"output.weight"} if not tied else set())
    for i in range(layers):
        names |= {f"blk.{i}.{n}.weight" for n in (*per_block, "attn_norm", "ffn_norm")}
    return names


def hf_shape(tensor) -> tuple[int, ...]:
    """A GGUF tensor's shape in torch order (the file stores ggml's reversed order; bf16 data are raw bytes)."""
    return tuple(int(n) for n in reversed(list(tensor.shape)))


def field(reader, key):
    return reader.fields[key].contents()


@torch.no_grad()
def relative_diff(reference, candidate, ids) -> float:
    a, b = reference(input_ids=ids).logits.float(), candidate(input_ids=ids).logits.float()
    return float((a - b).norm() / a.norm())


def bound(dtype: torch.dtype, config) -> float:
    """Rounding bound of the network: every weight matrix on the path (4 per block, then the head) in series."""
    k = max(config.hidden_size, config.intermediate_size, config.vocab_size)
    return rounding_bound(dtype, k, depth=4 * config.num_hidden_layers + 1)


@pytest.mark.parametrize(
    ("dtype", "torch_dtype", "ggml"),
    [("f32", torch.float32, "F32"), ("f16", torch.float16, "F16"), ("bf16", torch.bfloat16, "BF16")],
)
def test_gguf_export_reads_back_and_matches(tmp_path, dtype, torch_dtype, ggml):
    model, tok = load_model("tiny-llama")
    model = with_adapters(model)
    config = model.config
    result = export_model(model, tok, tmp_path / "g", "gguf", dtype=dtype, verbose=False)
    assert {"model.gguf", "Modelfile", "parity.json"} <= set(result.files)
    assert result.artefact == tmp_path / "g" / "model.gguf" and result.parity["file"] == "model.gguf"
    assert result.parity["ok"] and result.parity["greedy_agreement"] == 1.0
    assert result.parity["tokenizer_match"] is True

    reader = gguf.GGUFReader(result.artefact)
    assert field(reader, "general.architecture") == "llama"
    assert field(reader, "llama.block_count") == config.num_hidden_layers
    assert field(reader, "llama.attention.head_count_kv") == config.num_key_value_heads
    assert field(reader, "llama.rope.dimension_count") == config.hidden_size // config.num_attention_heads
    assert field(reader, "tokenizer.ggml.model") == "gpt2"
    assert len(field(reader, "tokenizer.ggml.tokens")) == config.vocab_size == len(tok)
    assert field(reader, "tokenizer.ggml.eos_token_id") == tok.eos_token_id
    assert field(reader, "tokenizer.ggml.token_type")[tok.bos_token_id] == gguf.TokenType.CONTROL
    assert field(reader, "tokenizer.chat_template") == tok.chat_template
    tensors = {t.name: t for t in reader.tensors}
    assert set(tensors) == expected_names(config.num_hidden_layers, tied=False)
    hf = model.state_dict()
    assert hf_shape(tensors["blk.1.ffn_down.weight"]) == tuple(
        hf["model.layers.1.mlp.down_proj.base_layer.weight"].shape
    )
    assert hf_shape(tensors["output.weight"]) == (config.vocab_size, config.hidden_size)
    assert tensors["blk.0.attn_q.weight"].tensor_type.name == ggml
    assert tensors["blk.0.attn_norm.weight"].tensor_type.name == "F32"  # norms stay f32

    folder = tmp_path / "g"
    reloaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file="model.gguf", dtype=torch.float32)
    reloaded_tok = AutoTokenizer.from_pretrained(folder, gguf_file="model.gguf")
    assert reloaded_tok(PROMPT)["input_ids"] == tok(PROMPT)["input_ids"]
    ids = torch.tensor([tok(PROMPT)["input_ids"]])
    merged = merged_copy(model)
    base, _ = load_model("tiny-llama")
    assert relative_diff(merged, base, ids) > 100 * bound(torch.float16, config)  # the adapters matter
    assert relative_diff(merged, reloaded, ids) <= bound(torch_dtype, config)
    kw = {"max_new_tokens": 8, "do_sample": False, "pad_token_id": tok.pad_token_id}
    assert torch.equal(merged.generate(ids, **kw), reloaded.generate(ids, **kw))

    text = (folder / "Modelfile").read_text()
    assert text.startswith("FROM ./model.gguf\n") and 'PARAMETER stop "</s>"' in text


def test_gguf_export_gqa_and_tied_embeddings(tmp_path):
    """k_proj with fewer kv heads is permuted per kv head; tied embeddings write no output.weight."""
    dims = {**TINY_DIMS, "kv_heads": 2, "tie": True}
    model = with_adapters(build_tiny("llama", "causal-lm", 2, dims))
    tok = byte_tokenizer()
    result = export_model(model, tok, tmp_path / "g", "gguf", dtype="f32", verbose=False)
    reader = gguf.GGUFReader(result.artefact)
    tensors = {t.name: t for t in reader.tensors}
    assert set(tensors) == expected_names(2, tied=True)
    head_dim = dims["hidden"] // dims["heads"]
    assert hf_shape(tensors["blk.0.attn_k.weight"]) == (2 * head_dim, dims["hidden"])
    # llama.cpp's LlamaModel.permute, written out independently: rotary halves -> interleaved pairs.
    k = merged_copy(model).model.layers[0].self_attn.k_proj.weight.detach().numpy()
    want = k.reshape(2, 2, head_dim // 2, dims["hidden"]).swapaxes(1, 2).reshape(k.shape)
    np.testing.assert_array_equal(np.asarray(tensors["blk.0.attn_k.weight"].data), want)
    reloaded = AutoModelForCausalLM.from_pretrained(
        tmp_path / "g", gguf_file="model.gguf", dtype=torch.float32
    )
    assert reloaded.config.tie_word_embeddings and reloaded.config.num_key_value_heads == 2
    ids = torch.tensor([tok(PROMPT)["input_ids"]])
    assert relative_diff(merged_copy(model), reloaded, ids) <= bound(torch.float32, model.config)


def test_gguf_export_of_a_bf16_model_as_f32_uses_the_bf16_bound(tmp_path):
    """The reference computes in bf16: its rounding, not f32's, sets the parity bound (no ParityWarning)."""
    model, tok = load_model("tiny-llama")
    model = with_adapters(model.to(torch.bfloat16))
    with warnings.catch_warnings():
        warnings.simplefilter("error", ParityWarning)
        result = export_model(model, tok, tmp_path / "g", "gguf", dtype="f32", verbose=False)
    assert result.parity["dtype"] == "bfloat16" and result.parity["ok"]
    assert result.parity["gguf_dtype"] == "f32"


def test_gguf_export_rejects_non_llama_and_bad_dtype(tmp_path):
    model, tok = load_model("tiny-gpt2")
    with pytest.raises(ValueError, match=r"GPT2LMHeadModel is not supported.*LlamaForCausalLM.*fmt='merged'"):
        export_model(model, tok, tmp_path / "g", "gguf")
    llama, tok = load_model("tiny-llama")
    with pytest.raises(ValueError, match="dtype must be one of f32, f16, bf16, got 'q4_0'"):
        export_model(llama, tok, tmp_path / "g", "gguf", dtype="q4_0")
    assert list(tmp_path.iterdir()) == []


def test_modelfile_translates_chatml_only():
    chatml = SimpleNamespace(
        chat_template="{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}",
        eos_token="<|im_end|>",
    )
    text = modelfile_text(chatml)
    assert 'TEMPLATE """' in text and "{{ .Content }}<|im_end|>" in text
    assert text.count('PARAMETER stop "<|im_end|>"') == 1
    plain = modelfile_text(SimpleNamespace(chat_template=None, eos_token="</s>"))
    assert plain == 'FROM ./model.gguf\n\nPARAMETER stop "</s>"\n'
