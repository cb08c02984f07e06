"""The parity check fails a broken export: a normwise logit bound, argmax, greedy and perplexity agreement."""

from __future__ import annotations

import copy
import math
import warnings

import pytest
import torch
from testutil import tuned_llama

from runlora_nb.assess.export import merged_copy
from runlora_nb.assess.parity import (
    ARGMAX_MIN,
    PPL_RTOL,
    TOKENIZER_TEXTS,
    ParityWarning,
    format_parity,
    logit_bound,
    parity_report,
    tokenizer_parity,
)
from runlora_nb.common.numerics import unit_roundoff


def check(model, candidate, tok, dtype=torch.float16):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ParityWarning)
        return parity_report(model, candidate, tok, dtype=dtype, label="test")


def test_an_intact_copy_passes_every_check_and_prints_ok():
    model, tok = tuned_llama()
    with warnings.catch_warnings():
        warnings.simplefilter("error", ParityWarning)
        report = parity_report(model, merged_copy(model), tok, dtype=torch.float16, label="merged")
    assert report["ok"] and report["failed"] == []
    assert report["rel_logit_diff"] < report["logit_bound"] / 100  # f32 merge rounding, far below f16's bound
    assert report["argmax_agreement"] == 1.0 and report["greedy_match"] is True
    assert abs(report["ppl_change"]) < PPL_RTOL[torch.float16]
    assert format_parity(report).startswith("parity merged (float16): OK; ")


def test_a_copy_with_its_last_mlp_zeroed_fails():
    """The old absolute tolerance (16·eps·sqrt(hidden·layers)·max|logit|) printed OK for such a copy."""
    model, tok = tuned_llama()
    broken = merged_copy(model)
    with torch.no_grad():
        for p in broken.model.layers[-1].mlp.parameters():
            p.zero_()
    with pytest.warns(ParityWarning, match="FAILED"):
        report = parity_report(model, broken, tok, dtype=torch.float16, label="broken")
    assert not report["ok"]
    assert {"logit", "argmax", "greedy"} <= set(report["failed"])
    assert report["rel_logit_diff"] > 4 * report["logit_bound"]
    assert report["argmax_agreement"] < ARGMAX_MIN[torch.float16]
    line = format_parity(report)
    assert ": FAILED (logit, argmax, greedy" in line and "rel_logit_diff=" in line and " FAILED," in line


def test_a_scaled_lm_head_fails_the_logit_bound_though_argmax_agrees():
    """Scaling the logits keeps every argmax and greedy token: only a bound relative to their norm sees it."""
    model, tok = tuned_llama()
    scaled = merged_copy(model)
    with torch.no_grad():
        scaled.lm_head.weight.mul_(1.5)
    report = check(model, scaled, tok)
    assert report["argmax_agreement"] == 1.0 and report["greedy_match"] is True
    assert report["rel_logit_diff"] == pytest.approx(0.5, rel=1e-3)
    assert not report["ok"] and "logit" in report["failed"]


def test_the_bound_comes_from_the_dtype_and_hidden_size_not_the_logit_scale():
    model, tok = tuned_llama()
    hidden = model.config.hidden_size
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        u = unit_roundoff(dtype)
        assert logit_bound(dtype, model.config) == pytest.approx(4 * (2 * math.sqrt(hidden) + 1) * u)
    assert logit_bound(torch.float16, model.config) < 0.05
    # logits ten times larger: the same relative error, the same verdict
    big = merged_copy(model)
    with torch.no_grad():
        big.lm_head.weight.mul_(10)
    ref = merged_copy(big)
    assert check(big, ref, tok)["ok"]
    with pytest.raises(TypeError, match=r"parity: no parity thresholds for dtype torch\.int8"):
        logit_bound(torch.int8, model.config)


def test_a_tokenizer_that_splits_one_text_differently_fails_and_names_it():
    """The parity prompts alone never reach the text where the two tokenizers part."""
    model, tok = tuned_llama()
    other = copy.deepcopy(tok)
    other.add_tokens(["北京"])  # one more vocabulary entry: only texts containing it encode differently
    assert tokenizer_parity(tok, copy.deepcopy(tok)) == (True, None)
    report = parity_report(
        model, merged_copy(model), tok, dtype=torch.float32, label="t", candidate_tokenizer=copy.deepcopy(tok)
    )
    assert report["ok"] and report["tokenizer_match"] is True and report["tokenizer_first_difference"] is None
    with pytest.warns(ParityWarning, match="FAILED \\(tokenizer\\)"):
        report = parity_report(
            model, merged_copy(model), tok, dtype=torch.float32, label="t", candidate_tokenizer=other
        )
    assert (
        report["failed"] == ["tokenizer"]
        and report["tokenizer_first_difference"] == "naïve café 北京 Ünïcödé — “quotes” emoji 🙂"
    )
    assert "first differing text 'naïve café 北京" in format_parity(report)


def test_the_special_tokens_are_checked_too():
    """A tokenizer that lost a special token (reads it as nothing) agrees on every plain text."""
    _, tok = tuned_llama()
    specials = [t for t in tok.all_special_tokens if t]
    assert specials  # tiny-llama has BOS/EOS

    def lost(text):
        return tok(text.replace(specials[0], ""))

    assert all(lost(t)["input_ids"] == tok(t)["input_ids"] for t in TOKENIZER_TEXTS)
    same, text = tokenizer_parity(tok, lost)
    assert not same and specials[0] in text
