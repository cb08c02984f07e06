"""ChatPanel: Send streams both sides into their columns, Stop ends it, errors stay in the panel."""

from __future__ import annotations

import time

import pytest
import torch
from panel_helpers import wait_until

from runlora_nb.assess.chat import ChatAB
from runlora_nb.assets.zoo import load_model
from runlora_nb.integrations.inject import apply_runlora, runlora_layers
from runlora_nb.widgets.chat_view import ChatPanel


@pytest.fixture(scope="module")
def tuned():
    model, tok = load_model("tiny-llama")
    apply_runlora(model, r=4, alpha=8, target_modules="all-linear")
    with torch.no_grad():
        for _, layer in runlora_layers(model):
            layer.lora_B.weight.normal_(0, 0.5, generator=torch.Generator().manual_seed(1))
    return model.eval(), tok


def test_send_fills_both_columns_and_the_status(tuned):
    model, tok = tuned
    view = ChatPanel(tokenizer=tok, model=model)
    view.max_new_tokens.value = 6
    assert view.controller.settings.max_new_tokens == 6
    view.prompt.value = "Hello there"
    view.send_button.click()
    assert view.controller.join(120)
    assert wait_until(lambda: not view._redraw.pending, 30)
    view._draw()
    texts = view.controller.texts
    assert texts["base"] and texts["tuned"] and texts["base"] != texts["tuned"]
    for name in ("base", "tuned"):
        assert view.columns[name].value.count("<div") == 1  # the column holds the streamed answer
    assert "base: 6 tokens" in view.status.value and "tuned: 6 tokens" in view.status.value
    assert not view.send_button.disabled and view.stop_button.disabled
    view.close()


def test_stop_button_and_errors(tuned):
    model, tok = tuned
    view = ChatPanel(ChatAB(tok, model=model))
    view.max_new_tokens.value = 512
    view.prompt.value = "Once"
    view.send_button.click()
    deadline = time.monotonic() + 120
    while view.controller.generated["base"] < 3 and time.monotonic() < deadline:
        time.sleep(0.001)
    view.stop_button.click()
    assert view.controller.join(120)
    assert list(view.controller.results) == ["base"] and view.controller.results["base"].stopped
    view.prompt.value = ""
    view.send_button.click()  # an empty prompt: shown in the panel, nothing raised
    assert "prompt is empty" in view.errors.text
    view.close()
    with pytest.raises(RuntimeError, match="closed"):
        view.send()
