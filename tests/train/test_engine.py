"""Training: HF Trainer and plain loops, gradient checkpointing, PEFT loss-curve equivalence, the FineTuner."""

from __future__ import annotations

import json
import threading
from dataclasses import replace

import pandas as pd
import peft
import pytest
import torch
from testutil import rel_err

from runlora_nb.assets.tokenized import make_dataset
from runlora_nb.assets.zoo import load_model
from runlora_nb.common.numerics import rounding_bound
from runlora_nb.integrations.inject import apply_runlora, runlora_layers
from runlora_nb.train import Callback, FineTuneConfig, FineTuner, enable_checkpointing, with_backend

QUICK = {
    "model": "tiny-llama",
    "lr": 3e-3,
    "seq_len": 64,
    "batch_size": 8,
    "sample_tokens": 6,
    "eval_batches": 2,
}


def test_hf_trainer_runs_three_steps(tmp_path):
    transformers = pytest.importorskip("transformers")
    model, tok = load_model("tiny-llama")
    apply_runlora(model, r=4, alpha=8, target_modules="all-linear", dropout=0.05)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), max_steps=3, per_device_train_batch_size=4, learning_rate=1e-2,
        report_to=[], save_strategy="no", logging_steps=1, use_cpu=True, disable_tqdm=True,
    )  # fmt: skip
    trainer = transformers.Trainer(model=model, args=args, train_dataset=make_dataset("sonnets", tok, 32))
    out = trainer.train()
    assert out.global_step == 3
    changed = [n for n, p in model.named_parameters() if p.requires_grad and not torch.equal(p, before[n])]
    assert len(changed) == len(before)  # every adapter (A and B) moved
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 3 and all(torch.isfinite(torch.tensor(losses)))


def model_config():
    return load_model("tiny-llama")[0].config


def _fp32_bound(cfg) -> float:
    """fp32 rounding bound of tiny-llama's logits and adapter gradients: k = its widest reduction, depth = the
    matmuls in series forward and back (4 per layer each way, plus the head), see docs/numerics.md."""
    k = max(cfg.hidden_size, cfg.intermediate_size)
    return rounding_bound(torch.float32, k, 8 * cfg.num_hidden_layers + 2)


@pytest.mark.parametrize("dropout", [0.0, 0.2])
def test_gradient_checkpointing_gives_the_same_gradients(dropout):
    def grads(checkpoint: bool):
        torch.manual_seed(0)
        model, _ = load_model("tiny-llama")
        apply_runlora(
            model, r=4, alpha=8, dropout=dropout, target_modules="all-linear", init_lora_weights=False
        )
        if checkpoint:
            enable_checkpointing(model)
            model.enable_input_require_grads()
        model.train()
        ids = torch.randint(3, 200, (2, 16), generator=torch.Generator().manual_seed(0))
        torch.manual_seed(5)
        model(input_ids=ids, labels=ids).loss.backward()
        return {n: layer.lora_A.weight.grad.clone() for n, layer in runlora_layers(model)}

    plain, ckpt = grads(False), grads(True)
    assert plain.keys() == ckpt.keys()
    for name in plain:  # recomputation regenerates the same dropout masks (checkpoint restores the RNG)
        assert rel_err(ckpt[name], plain[name]) <= 2 * _fp32_bound(model_config()), name


@pytest.mark.parametrize(
    ("dtype", "quant", "tol"),
    [("fp32", None, 1e-5), ("bf16", None, 1e-2), ("fp32", "nf4", 1e-2)],
    ids=["fp32", "bf16", "nf4"],
)
def test_loss_curves_match_peft(dtype, quant, tol, tmp_path):
    """Short CI version (10 steps) of the 30-step equivalence; same init, data and seed, dropout 0."""
    cfg = FineTuneConfig(
        **QUICK, steps=10, dropout=0.0, dtype=dtype, quantization=quant, eval_interval=0, sample_prompts=(),
        output_dir=str(tmp_path / "runlora"),
    )  # fmt: skip
    ours = FineTuner(cfg).run()
    theirs = FineTuner(replace(with_backend(cfg, "peft"), output_dir=str(tmp_path / "peft"))).run()
    a = torch.tensor([s.loss for s in ours.steps], dtype=torch.float64)
    b = torch.tensor([s.loss for s in theirs.steps], dtype=torch.float64)
    assert len(a) == len(b) == 10
    assert ((a - b).abs() / b.abs()).max() <= tol


class Recorder(Callback):
    def __init__(self):
        self.names = []

    def on_start(self, event):
        self.names.append("start")

    def on_sample(self, event):
        self.names.append(f"sample:{event.stage}")

    def on_step(self, event):
        self.names.append("step")

    def on_eval(self, event):
        self.names.append(f"eval@{event.step}")

    def on_end(self, event):
        self.names.append("end")


def test_twenty_steps_lower_validation_loss_and_events_fire_in_order(tmp_path):
    rec = Recorder()
    res = FineTuner(
        FineTuneConfig(**QUICK, steps=20, eval_interval=10, output_dir=str(tmp_path)), [rec]
    ).run()
    assert rec.names == ["start", "sample:before", "eval@0", *["step"] * 10, "eval@10", *["step"] * 10, "eval@20",
                         "sample:after", "end"]  # fmt: skip
    assert res.evals[-1].val_loss < res.evals[0].val_loss - 0.3
    assert res.end.adapter_dir == str(tmp_path) and not res.end.stopped
    assert res.tokens_per_s > 0 and len(res.losses()) == 20
    assert len(res.samples) == 2 and res.samples[0].stage == "before"


def test_same_seed_same_run(tmp_path):
    cfg = FineTuneConfig(
        **QUICK, steps=5, dropout=0.1, eval_interval=0, sample_prompts=(), output_dir=str(tmp_path)
    )
    a = [s.loss for s in FineTuner(cfg).run().steps]
    b = [s.loss for s in FineTuner(cfg).run().steps]
    assert a == b
    other = FineTuneConfig(**{**cfg.__dict__, "seed": 1})
    assert [s.loss for s in FineTuner(other).run().steps] != a


class StopAt(Callback):
    """Stops the run after step ``step`` through the stop function it is handed (never the trainer)."""

    def __init__(self, step, stop=None):
        self.step, self.stop = step, stop

    def on_step(self, event):
        if event.step == self.step:
            self.stop()


def test_stop_from_a_callback_saves_an_adapter_peft_loads(tmp_path):
    tuner = FineTuner(FineTuneConfig(**QUICK, steps=50, eval_interval=0, output_dir=str(tmp_path)))
    tuner.add_callback(StopAt(3, tuner.stop))
    res = tuner.run()
    assert res.end.stopped and res.end.step == 3 and len(res.steps) == 3
    base, _ = load_model("tiny-llama")
    pm = peft.PeftModel.from_pretrained(base, tmp_path).eval()
    ids = torch.randint(3, 200, (2, 12), generator=torch.Generator().manual_seed(0))
    tuner.model.eval()
    with torch.no_grad():
        assert rel_err(pm(input_ids=ids).logits, tuner.model(input_ids=ids).logits) <= 2 * _fp32_bound(
            base.config
        )


def test_stop_from_another_thread_ends_within_two_steps(tmp_path):
    first_step = threading.Event()

    class Signal(Callback):
        def on_step(self, event):
            first_step.set()

    tuner = FineTuner(
        FineTuneConfig(**QUICK, steps=500, eval_interval=0, output_dir=str(tmp_path)), [Signal()]
    )
    thread = tuner.start()
    assert first_step.wait(60)
    asked_at = tuner.step
    tuner.stop()
    thread.join(60)
    assert not thread.is_alive() and not tuner.running
    assert tuner.history.end.stopped and tuner.history.end.step <= asked_at + 2
    assert (tmp_path / "adapter_model.safetensors").exists()


def test_classification_run_reports_accuracy(tmp_path):
    cfg = FineTuneConfig(
        model="tiny-roberta", dataset="chatterbot", task="classification", steps=3, seq_len=32, batch_size=8,
        eval_interval=0, eval_batches=2, output_dir=str(tmp_path),
    )  # fmt: skip
    res = FineTuner(cfg).run()
    assert res.evals[-1].accuracy is not None and 0 <= res.evals[-1].accuracy <= 1
    assert res.samples == []


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        ({"steps": 0}, "steps must be >= 1"),
        ({"backend": "lora"}, "backend must be"),
        ({"lr": 0}, "lr must be > 0"),
    ],
)
def test_config_errors(kw, match):
    with pytest.raises(ValueError, match=match):
        FineTuneConfig(**kw)


def test_errors_reach_on_end_and_the_caller(tmp_path):
    rec = Recorder()
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    with pytest.raises(ValueError, match="empty"):
        FineTuner(FineTuneConfig(**{**QUICK, "steps": 2}, dataset=str(empty)), [rec]).run()
    with pytest.raises(ValueError, match="tiny-llama"):
        FineTuner(FineTuneConfig(**{**QUICK, "model": "no-such-model"})).run()
    assert rec.names == ["end"]


def test_demo_runs_fast(tmp_path, capsys):
    from runlora_nb.app.cli import main

    assert main(["demo", "--fast", "--out", str(tmp_path), "--steps", "6"]) == 0
    html = (tmp_path / "report.html").read_text()
    assert "Plotly.newPlot" in html and "Chain race" in html and "Samples before / after" in html
    # the PoC checks: evaluation base vs tuned, the memory ledger, a merged export's parity
    assert (
        "Evaluation: base (adapters off) vs tuned" in html and "Memory ledger: predicted vs measured" in html
    )
    assert "Export parity (merged" in html
    evaluation = pd.read_csv(tmp_path / "evaluation.csv").set_index("variant")
    assert (
        evaluation.loc["adapted", "loss"] < evaluation.loc["base", "loss"]
    )  # 6 steps at lr 3e-3 learn something
    assert json.loads((tmp_path / "parity.json").read_text())["ok"] is True
    memory = pd.read_csv(tmp_path / "memory.csv").set_index("backend")
    assert (
        memory.loc["runlora", "activation_bytes_measured"] < memory.loc["peft", "activation_bytes_measured"]
    )
    assert (tmp_path / "adapter" / "adapter_model.safetensors").exists()
    out = capsys.readouterr().out
    assert "validation loss" in out and "wrote" in out


def test_run_is_refused_while_a_start_thread_trains(tmp_path):
    """A second loop on the same trainer (and model) must be refused, not interleaved with the first."""
    first_step, release = threading.Event(), threading.Event()

    class Hold(Callback):
        def on_step(self, event):
            first_step.set()
            release.wait(60)

    tuner = FineTuner(FineTuneConfig(**QUICK, steps=500, eval_interval=0, output_dir=str(tmp_path)), [Hold()])
    thread = tuner.start()
    try:
        assert first_step.wait(60)
        with pytest.raises(RuntimeError, match="already training"):
            tuner.run()
        with pytest.raises(RuntimeError, match="already running"):
            tuner.start()
    finally:
        tuner.stop()
        release.set()
        thread.join(60)
    assert not thread.is_alive() and not tuner.running and tuner.history.end.stopped


def test_restart_after_stop_does_not_evaluate_a_step_twice(tmp_path):
    """run() again after stop() resumes after the stop step; it must not evaluate that step a second time."""
    tuner = FineTuner(FineTuneConfig(**QUICK, steps=4, eval_interval=0, output_dir=str(tmp_path)))
    stopper = StopAt(2, tuner.stop)
    tuner.add_callback(stopper)
    assert tuner.run().end.step == 2
    assert [e.step for e in tuner.history.evals] == [0, 2]
    stopper.step = None
    res = tuner.run()
    assert res.end.step == 4 and not res.end.stopped
    assert [e.step for e in res.evals] == [0, 2, 4]
    assert [s.step for s in res.steps] == [1, 2, 3, 4]
