"""TrainerMonitor: a thin view over LedgerCallback, driven by a real Trainer and by recorded events."""

from __future__ import annotations

import math

import pytest

from runlora_nb.ledger.hf_trainer import LedgerCallback
from runlora_nb.widgets.trainer_monitor import TrainerMonitor, ema


def test_ema_is_bias_corrected_and_zero_weight_is_identity():
    assert ema([1.0, 2.0, 3.0], 0.0) == [1.0, 2.0, 3.0]
    out = ema([2.0, 2.0, 2.0], 0.9)
    assert out == pytest.approx([2.0, 2.0, 2.0])  # a constant stays constant (no pull towards 0)
    assert math.isnan(ema([1.0, math.nan, 3.0], 0.5)[1])


def _feed(cb, n=6):
    for k in range(1, n + 1):
        cb._emit("step", {"step": k, "train_loss": 5.0 / k, "lr": 1e-3, "tokens_per_s": 100.0, "step_s": 0.1})
        if k % 3 == 0:
            cb._emit("eval", {"step": k, "val_loss": 6.0 / k, "perplexity": math.exp(6.0 / k)})


def test_monitor_draws_train_smoothed_eval_and_lr():
    cb = LedgerCallback()
    view = TrainerMonitor(cb)
    _feed(cb)
    view._redraw.flush()
    train, smooth, evals, lr = view.figure.data
    assert list(train.x) == [1, 2, 3, 4, 5, 6] and list(train.y) == pytest.approx(
        [5.0 / k for k in range(1, 7)]
    )
    assert list(evals.x) == [3, 6] and list(lr.y) == [1e-3] * 6
    assert smooth.y[-1] > train.y[-1]  # smoothing lags a falling curve
    view.smoothing.value = 0.0
    assert list(view.figure.data[1].y) == pytest.approx(list(train.y))
    view.log_y.value = True
    assert view.figure.layout.yaxis.type == "log"
    assert "step 6" in view.status.value and "eval loss 1.0000" in view.status.value
    cb._emit("end", {"status": "finished", "step": 6})
    assert "<b>finished</b>" in view.status.value
    view.close()
    assert cb._listeners == []  # closing unsubscribes


def test_a_failing_redraw_is_shown_in_the_panel():
    cb = LedgerCallback()
    view = TrainerMonitor(cb)
    cb._emit("step", {"step": 1, "train_loss": 1.0, "lr": 1e-3, "step_s": 0.1})  # no tokens_per_s: fine
    view._redraw.flush()
    cb._emit("step", {"step": 2})  # a malformed record: the panel reports, the caller survives
    view._redraw.flush()
    assert "trainer update" in view.errors.text or "KeyError" in view.errors.text
