"""Evaluation: adapters toggled without reload, loss/perplexity/accuracy, exact match and ROUGE-L on JSONL pairs."""

from __future__ import annotations

import json
import math

import peft
import pytest
import torch

from runlora_nb.assess.evaluate import (
    compare_adapters,
    dataset_loss,
    evaluate_pairs,
    exact_match,
    read_pairs,
    rouge_l,
    summarize_pairs,
)
from runlora_nb.assets.tokenized import make_dataset
from runlora_nb.assets.zoo import load_model
from runlora_nb.integrations.adapter_switch import adapters_disabled
from runlora_nb.integrations.inject import apply_runlora, get_peft_model, runlora_layers


def tuned(task="causal-lm", num_labels=2):
    model, tok = load_model("tiny-llama", task=task, num_labels=num_labels)
    apply_runlora(model, r=4, alpha=8, target_modules="all-linear")
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for _, layer in runlora_layers(model):
            layer.lora_B.weight.copy_(torch.randn(layer.lora_B.weight.shape, generator=gen) * 0.05)
    return model.eval(), tok


def out_logits(model, tok):
    with torch.no_grad():
        return model(**tok("hello there", return_tensors="pt")).logits


def test_adapters_disabled_gives_the_base_and_restores():
    model, tok = tuned()
    base, _ = load_model("tiny-llama")
    adapted = out_logits(model, tok)
    assert not torch.allclose(adapted, out_logits(base, tok))
    with adapters_disabled(model):
        torch.testing.assert_close(out_logits(model, tok), out_logits(base, tok), rtol=0, atol=1e-6)
    torch.testing.assert_close(out_logits(model, tok), adapted, rtol=0, atol=0)
    with pytest.raises(RuntimeError), adapters_disabled(model):
        raise RuntimeError("inside")
    torch.testing.assert_close(out_logits(model, tok), adapted, rtol=0, atol=0)


def test_adapters_disabled_peft_and_errors():
    base, tok = load_model("tiny-llama")
    ref = out_logits(base, tok)
    model = get_peft_model(base, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    with adapters_disabled(model):
        torch.testing.assert_close(out_logits(model, tok), ref, rtol=0, atol=1e-6)
    plain, _ = load_model("tiny-llama")
    with pytest.raises(ValueError, match="no RunLoRA or PEFT adapters"), adapters_disabled(plain):
        pass


def test_compare_adapters_base_row_is_the_plain_model(tmp_path):
    model, tok = tuned()
    val = make_dataset("sonnets", tok, 64, "validation")
    df = compare_adapters(model, val, batch_size=4, max_batches=2, run_dir=tmp_path)
    assert list(df["variant"]) == ["base", "adapted"]
    plain, _ = load_model("tiny-llama")
    ref = dataset_loss(plain, val, batch_size=4, max_batches=2)
    base = df.iloc[0]
    assert base["loss"] == pytest.approx(ref["loss"], rel=1e-5)  # fp32 mean over ~500 tokens
    assert base["perplexity"] == pytest.approx(math.exp(ref["loss"]), rel=1e-5)
    assert abs(df.iloc[1]["loss"] - base["loss"]) > 1e-3
    assert base["tokens"] == 8 * 63
    assert (tmp_path / "eval_loss.csv").read_text().startswith("variant,loss")


def test_classification_accuracy():
    _probe, tok = load_model("tiny-llama")
    val = make_dataset("chatterbot", tok, 64, "validation", task="classification")
    model, tok = tuned("sequence-classification", len(val.label_names))
    got = dataset_loss(model, val, batch_size=16)
    with torch.no_grad():
        logits = model(
            input_ids=val.tensors["input_ids"], attention_mask=val.tensors["attention_mask"]
        ).logits
    want = float((logits.argmax(-1) == val.tensors["labels"]).double().mean())  # an exact fraction
    assert got["accuracy"] == pytest.approx(want, abs=1e-9) and got["perplexity"] is None


def test_scores():
    assert exact_match("  Paris \n", "Paris") == 1.0 and exact_match("paris", "Paris") == 0.0
    assert rouge_l("the cat sat", "the cat sat down") == pytest.approx(2 * 0.75 / 1.75)
    assert rouge_l("", "anything") == 0.0


def test_evaluate_pairs_scores_generations_and_writes(tmp_path):
    model, tok = tuned()
    probe = evaluate_pairs(model, tok, [{"prompt": "To be", "reference": "x"}], 6, compare_base=False)
    own = probe.iloc[0]["generation"]
    path = tmp_path / "pairs.jsonl"
    lines = [{"prompt": "To be", "reference": own}, {"prompt": "Hi", "reference": "zzzz qqq"}]
    path.write_text("\n".join(json.dumps(r) for r in lines) + "\n\n")
    df = evaluate_pairs(model, tok, path, 6, run_dir=tmp_path)
    assert len(df) == 4 and list(df["variant"].unique()) == ["base", "adapted"]
    adapted = df[df["variant"] == "adapted"].reset_index()
    assert adapted.loc[0, "generation"] == own and adapted.loc[0, "exact_match"] == 1.0
    if own.strip():
        assert adapted.loc[0, "rouge_l"] == pytest.approx(1.0) or not any(c.isalnum() for c in own)
    summary = summarize_pairs(df)
    assert list(summary["pairs"]) == [2, 2]
    assert (tmp_path / "eval_pairs.csv").exists()
    stored = json.loads((tmp_path / "eval_summary.json").read_text())
    assert [r["variant"] for r in stored] == ["base", "adapted"]


def test_read_pairs_errors_name_line_and_key(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"prompt": "a", "reference": "b"}\n\n{"prompt": "c"}\n')
    with pytest.raises(ValueError, match=r"line 3 has no 'reference' key"):
        read_pairs(path)
    path.write_text('{"prompt": "a", "reference": "b"}\nnot json\n')
    with pytest.raises(ValueError, match="line 2 is not valid JSON"):
        read_pairs(path)
    path.write_text('{"reference": "b"}\n')
    with pytest.raises(ValueError, match="line 1 has no 'prompt' key"):
        evaluate_pairs(None, None, path)
