"""The ln(vocab) guard on its own: a pure check of step events, no trainer needed."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest

from runlora_nb.train import FineTuneConfig
from runlora_nb.train.guards import UniformLossGuard


@pytest.mark.parametrize(("offset", "warns"), [(0.005, True), (0.02, False)])
def test_loss_stuck_at_ln_vocab_for_the_first_eval_window_warns_once(offset, warns):
    cfg = FineTuneConfig(model="tiny-llama", eval_interval=5, steps=20, lr=0.5)
    guard, ln_v = UniformLossGuard(cfg, vocab=1000), math.log(1000)
    messages = []
    for step in range(1, 8):  # one step out of the band (step 3 with offset 2%) clears the warning
        loss = ln_v * (1 + (offset if step == 3 else 0.001))
        message = guard.check(SimpleNamespace(step=step, loss=loss))
        if message:
            messages.append((step, message))
    assert bool(messages) == warns
    if warns:
        ((step, text),) = messages
        assert step == 5 and "steps 1-5" in text and "lr=0.5" in text


def test_no_vocabulary_no_guard():
    guard = UniformLossGuard(FineTuneConfig(model="tiny-llama", eval_interval=2, steps=4), vocab=None)
    assert all(guard.check(SimpleNamespace(step=s, loss=0.0)) is None for s in range(1, 5))
