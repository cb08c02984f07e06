"""Chat A/B: base vs tuned on one model, streamed through transformers' TextIteratorStreamer; Stop works."""

from __future__ import annotations

import time

import pytest
import torch

from runlora_nb.assess.chat import ChatAB, ChatSettings
from runlora_nb.assets.zoo import load_model
from runlora_nb.integrations.adapter_switch import adapters_disabled
from runlora_nb.integrations.inject import apply_runlora, runlora_layers


@pytest.fixture(scope="module")
def tuned():
    model, tok = load_model("tiny-llama")
    # "flops" plans from shapes alone: the streamed and the reference generation run the very same chains, whatever
    # the timing planner would pick on a loaded machine (a near-tie of random weights then cannot flip a token)
    apply_runlora(model, r=4, alpha=8, target_modules="all-linear", chain="flops")
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for _, layer in runlora_layers(model):
            layer.lora_B.weight.copy_(torch.randn(layer.lora_B.weight.shape, generator=gen) * 0.5)
    return model.eval(), tok


def _greedy(model, tok, chat, prompt, n):
    enc = chat.encode(prompt)
    with torch.no_grad():
        ids = model.generate(
            **enc, max_new_tokens=n, do_sample=False, pad_token_id=tok.pad_token_id or tok.eos_token_id
        )
    return tok.decode(ids[0, enc["input_ids"].shape[-1] :], skip_special_tokens=True)


def test_base_and_tuned_stream_what_generate_gives(tuned):
    model, tok = tuned
    chat = ChatAB(tok, model=model, settings=ChatSettings(max_new_tokens=8))
    events = []
    chat.subscribe(lambda kind, payload: events.append((kind, payload)))
    results = chat.run("Shall I compare thee")
    assert list(results) == ["base", "tuned"]
    with adapters_disabled(model):
        want_base = _greedy(model, tok, chat, "Shall I compare thee", 8)
    want_tuned = _greedy(model, tok, chat, "Shall I compare thee", 8)
    assert results["base"].text == want_base and results["tuned"].text == want_tuned
    assert want_base != want_tuned  # the adapter matters, and base really ran without it
    streamed = {
        side: "".join(p for k, (s, p) in [(k, v) for k, v in events if k == "token"] if s == side)
        for side in ("base", "tuned")
    }
    assert streamed == {"base": want_base, "tuned": want_tuned}  # piece by piece, in order
    assert next(k for k, _ in events) == "start" and events[-1][0] == "done"
    assert all(r.new_tokens == 8 and r.tokens_per_s > 0 for r in results.values())
    assert all(m.adapter_enabled for _, m in runlora_layers(model))  # restored after the base side


def test_stop_ends_the_generation_early_and_skips_the_other_side(tuned):
    model, tok = tuned
    chat = ChatAB(tok, model=model, settings=ChatSettings(max_new_tokens=400))
    chat.start("Once upon a time")
    deadline = time.monotonic() + 120
    while chat.generated["base"] < 5 and time.monotonic() < deadline:  # mid-answer (a text piece may lag)
        time.sleep(0.001)
    assert chat.generated["base"] >= 5, "no tokens generated within 120 s"
    chat.stop()
    assert chat.join(120), "Stop did not end the chat within 120 s"
    assert list(chat.results) == ["base"] and chat.results["base"].stopped
    assert chat.results["base"].new_tokens < 400
    assert all(m.adapter_enabled for _, m in runlora_layers(model))


def test_bad_input_is_refused_with_the_fix(tuned):
    model, tok = tuned
    with pytest.raises(ValueError, match="give model="):
        ChatAB(tok)
    with pytest.raises(ValueError, match="max_new_tokens must be a positive int"):
        ChatSettings(max_new_tokens=0)
    chat = ChatAB(tok, model=model)
    with pytest.raises(ValueError, match="prompt is empty"):
        chat.start("  ")
    with pytest.raises(ValueError, match="unknown setting 'temp'"):
        chat.set(temp=0.5)
    assert chat.set(do_sample=True, temperature=0.5).temperature == 0.5
