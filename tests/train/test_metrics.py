"""One definition of each metric: the engine's validation loss is token-weighted, as ``assess.evaluate``'s."""

from __future__ import annotations

import math

import pytest

from runlora_nb.assess.evaluate import dataset_loss
from runlora_nb.assets.tokenized import batches
from runlora_nb.common.metrics import perplexity, steady_tokens_per_s
from runlora_nb.train import FineTuneConfig, FineTuner
from runlora_nb.train.metrics import batch_nll


def test_engine_val_loss_equals_assess_dataset_loss_when_padding_varies():
    # instruction rows have prompt labels masked and padding that differs from batch to batch
    cfg = FineTuneConfig(model="tiny-llama", dataset="chatterbot", task="instruction", seq_len=48, batch_size=4,
                         eval_batches=6, steps=1, sample_prompts=())  # fmt: skip
    tuner = FineTuner(cfg)
    tuner.prepare()
    event = tuner.evaluate()
    ref = dataset_loss(tuner.model, tuner.val_set, batch_size=cfg.batch_size, max_batches=cfg.eval_batches)
    assert event.tokens == ref["tokens"] > 0
    # both sum fp32 NLLs over the same tokens, batch by batch in the same order: equal up to float rounding
    assert event.val_loss == pytest.approx(ref["loss"], rel=1e-6)
    assert event.perplexity == pytest.approx(ref["perplexity"], rel=1e-5)
    # the check can fail: the batches carry different numbers of target tokens, so a mean of batch means differs
    parts = [
        batch_nll(tuner.model, b)
        for _, b in zip(range(cfg.eval_batches), batches(tuner.val_set, 4, shuffle=False))
    ]
    counts = {p.count for p in parts}
    assert len(counts) > 1, f"the validation batches all hold {counts} target tokens: padding does not vary"
    naive = sum(p.nll / p.count for p in parts) / len(parts)
    assert abs(naive - event.val_loss) > 1e-6 * event.val_loss


def test_perplexity_has_one_policy_and_no_clamp_that_hides_a_bad_run():
    assert perplexity(math.log(32.0)) == pytest.approx(32.0)
    assert perplexity(60.0) == pytest.approx(math.exp(60.0))  # a clamp at 50 used to report e^50
    assert perplexity(800.0) == math.inf
    assert math.isnan(perplexity(float("nan"))) and math.isnan(perplexity(None))


def test_steady_tokens_per_s_leaves_out_the_first_step_and_takes_the_ordinary_median():
    assert steady_tokens_per_s([1.0, 10.0, 20.0, 30.0, 40.0]) == 25.0  # not the upper median (30)
    assert steady_tokens_per_s([7.0]) == 7.0
    assert math.isnan(steady_tokens_per_s([]))
    assert steady_tokens_per_s([1.0, None, 4.0, float("nan"), 6.0]) == 5.0
