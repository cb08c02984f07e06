"""LedgerCallback: a Hugging Face Trainer / TRL SFTTrainer run on a RunLoRA model lands in the run ledger."""

from __future__ import annotations

import math
import time

import peft
import pytest
from testutil import Rows

from runlora_nb.assets.tokenized import make_dataset
from runlora_nb.assets.zoo import load_model
from runlora_nb.integrations.inject import apply_runlora, get_peft_model
from runlora_nb.ledger import list_runs, load_run
from runlora_nb.ledger.hf_trainer import LedgerCallback
from runlora_nb.ledger.run_compare import compare

STEPS = 4


def _args(tmp_path, **kw):
    from transformers import TrainingArguments

    return TrainingArguments(
        output_dir=str(tmp_path / "out"),
        max_steps=STEPS,
        per_device_train_batch_size=2,
        per_device_eval_batch_size=2,
        learning_rate=1e-3,
        logging_steps=1,
        eval_strategy="steps",
        eval_steps=2,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        include_num_input_tokens_seen=True,
        disable_tqdm=True,
        seed=0,
        **kw,
    )


@pytest.mark.parametrize("backend", ["runlora", "peft"])
def test_trainer_run_is_recorded(tmp_path, backend):
    from transformers import Trainer

    model, tok = load_model("tiny-llama")
    if backend == "runlora":
        apply_runlora(model, r=4, alpha=8, target_modules="all-linear")
    else:
        model = get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    train = Rows(make_dataset("sonnets", tok, 32, "train"), 8)
    val = Rows(make_dataset("sonnets", tok, 32, "validation"), 4)
    cb = LedgerCallback(root=tmp_path / "runs", dataset="sonnets")
    seen = []
    cb.subscribe(lambda kind, rec: seen.append(kind))
    Trainer(model=model, args=_args(tmp_path), train_dataset=train, eval_dataset=val, callbacks=[cb]).train()

    run = load_run(cb.id, tmp_path / "runs")
    assert run.status == "finished"
    assert list(run.steps["step"]) == [1, 2, 3, 4]
    assert run.steps["train_loss"].map(math.isfinite).all()
    assert (run.steps["tokens_per_s"] > 0).all()  # from num_input_tokens_seen
    assert list(run.evals["step"]) == [2, 4] and (run.evals["val_loss"] > 0).all()
    c = run.config
    assert (c["backend"], c["r"], c["alpha"], c["lr"], c["steps"]) == (backend, 4, 8, 1e-3, STEPS)
    assert run.info["trainable_params"] < run.info["total_params"]
    if backend == "runlora":
        assert len(run.plans) > 0 and {"fwd", "bwd"} <= set(run.plans.columns)  # the chain plan in use
    assert seen.count("step") == STEPS and seen.count("eval") == 2 and seen[-1] == "end"
    listed = list_runs(tmp_path / "runs")
    assert list(listed["id"]) == [cb.id] and listed.iloc[0]["val_loss"] == pytest.approx(
        run.evals.val_loss.iloc[-1]
    )
    assert len(compare([cb.id], tmp_path / "runs").curves) > 0
    # one history: the callback's live one and the one read back from the folder agree, metric by metric
    live, back = cb.history, run.history()
    assert [s.step for s in live.steps] == [s.step for s in back.steps] == [1, 2, 3, 4]
    assert [s.loss for s in live.steps] == pytest.approx([s.loss for s in back.steps])
    assert live.tokens_per_s == pytest.approx(back.tokens_per_s) and live.tokens_per_s > 0
    assert live.val_loss == pytest.approx(back.val_loss) and live.end.step == STEPS


def test_trainer_stopped_early_is_marked_stopped(tmp_path):
    from transformers import Trainer, TrainerCallback

    class StopAt2(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            if state.global_step == 2:
                control.should_training_stop = True

    model, tok = load_model("tiny-llama")
    apply_runlora(model, r=4, alpha=8, target_modules="all-linear")
    train = Rows(make_dataset("sonnets", tok, 32, "train"), 8)
    cb = LedgerCallback(root=tmp_path / "runs")
    args = _args(tmp_path)
    args.eval_strategy = "no"
    Trainer(model=model, args=args, train_dataset=train, callbacks=[cb, StopAt2()]).train()
    run = load_run(cb.id, tmp_path / "runs")
    assert run.status == "stopped" and run.state["step"] == 2


def test_sft_trainer_run_is_recorded(tmp_path):
    datasets = pytest.importorskip("datasets", reason="trl's dependency; in the dev extra")
    from trl import SFTConfig, SFTTrainer

    model, tok = load_model("tiny-llama")
    apply_runlora(model, r=4, alpha=8, target_modules="all-linear")
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    texts = [f"Line {k}: shall I compare thee to a summer's day? Thou art more lovely." for k in range(8)]
    data = datasets.Dataset.from_dict({"text": texts})
    args = SFTConfig(
        output_dir=str(tmp_path / "out"),
        max_steps=STEPS,
        per_device_train_batch_size=2,
        logging_steps=1,
        learning_rate=1e-3,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        max_length=32,
        disable_tqdm=True,
    )
    cb = LedgerCallback(root=tmp_path / "runs", dataset="sonnet lines")
    SFTTrainer(model=model, args=args, train_dataset=data, processing_class=tok, callbacks=[cb]).train()
    run = load_run(cb.id, tmp_path / "runs")
    assert run.status == "finished" and list(run.steps["step"]) == [1, 2, 3, 4]
    assert run.steps["train_loss"].map(math.isfinite).all() and run.config["backend"] == "runlora"


@pytest.mark.parametrize("backend", ["runlora", "peft"])
def test_the_record_names_the_zoo_model_and_the_adapter_settings(tmp_path, backend):
    """A zoo model was recorded with a blank model name and no adapter settings."""
    from transformers import Trainer

    model, tok = load_model("tiny-llama")
    if backend == "runlora":
        apply_runlora(model, r=4, alpha=8, dropout=0.1, target_modules="all-linear")
        targets = "all-linear"
    else:
        lora = peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.1, target_modules=["v_proj", "q_proj"])
        model = get_peft_model(model, lora)
        targets = ["q_proj", "v_proj"]
    args = _args(tmp_path)
    args.eval_strategy, args.max_steps = "no", 1
    cb = LedgerCallback(root=tmp_path / "runs")
    train = Rows(make_dataset("sonnets", tok, 32, "train"), 4)
    Trainer(model=model, args=args, train_dataset=train, callbacks=[cb]).train()
    c = load_run(cb.id, tmp_path / "runs").config
    assert c["model"] == "tiny-llama"
    assert c["adapter"] == {"r": 4, "alpha": 8, "dropout": pytest.approx(0.1), "targets": targets}
    assert c["targets"] == targets and c["modules"] > 0
    assert list_runs(tmp_path / "runs").iloc[0]["model"] == "tiny-llama"


def test_tokens_per_second_leaves_out_the_time_spent_evaluating(tmp_path):
    """The step logged after an evaluation counted the evaluation's time as training time."""
    from transformers import Trainer, TrainerCallback

    class SlowEval(TrainerCallback):
        def on_prediction_step(self, args, state, control, **kw):
            time.sleep(0.5)  # 2 batches: each evaluation takes over a second

    model, tok = load_model("tiny-llama")
    apply_runlora(model, r=4, alpha=8, target_modules="all-linear")
    train = Rows(make_dataset("sonnets", tok, 32, "train"), 8)
    val = Rows(make_dataset("sonnets", tok, 32, "validation"), 4)
    cb = LedgerCallback(root=tmp_path / "runs")
    trainer = Trainer(model=model, args=_args(tmp_path), train_dataset=train, eval_dataset=val,
                      callbacks=[cb, SlowEval()])  # fmt: skip
    trainer.train()
    steps = load_run(cb.id, tmp_path / "runs").steps.set_index("step")
    assert steps.step_s[3] < 0.5  # step 3 follows the evaluation at step 2
    assert steps.tokens_per_s[3] > 0.2 * steps.tokens_per_s.median()


@pytest.mark.parametrize(
    ("error", "status"),
    [(KeyboardInterrupt, "interrupted"), (RuntimeError, "failed")],
    ids=["ctrl-c", "error"],
)
def test_a_run_that_train_ends_by_raising_is_not_left_running(tmp_path, error, status):
    """Ctrl-C during trainer.train() skips on_train_end: the run stayed "running" in the live kernel."""
    from transformers import Trainer, TrainerCallback

    class RaiseAt2(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            if state.global_step == 2:
                raise error("boom")

    model, tok = load_model("tiny-llama")
    apply_runlora(model, r=4, alpha=8, target_modules="all-linear")
    train = Rows(make_dataset("sonnets", tok, 32, "train"), 8)
    cb = LedgerCallback(root=tmp_path / "runs")
    args = _args(tmp_path)
    args.eval_strategy = "no"
    ends = []
    cb.subscribe(lambda kind, rec: ends.append(rec["status"]) if kind == "end" else None)
    trainer = Trainer(model=model, args=args, train_dataset=train, callbacks=[cb, RaiseAt2()])
    with pytest.raises(error):
        trainer.train()
    run = load_run(cb.id, tmp_path / "runs")
    assert run.status == status and run.state["status"] == status  # status.json itself, for other readers
    assert run.state["step"] == 2 and run.state["message"]
    assert ends == [status]
    assert list_runs(tmp_path / "runs").iloc[0]["status"] == status
