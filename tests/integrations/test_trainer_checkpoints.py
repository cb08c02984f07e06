"""adapter_checkpoints: Trainer / SFTTrainer checkpoints of an apply_runlora model are PEFT adapters and resume."""

from __future__ import annotations

import peft
import pytest
import torch
from testutil import Rows

from runlora_nb.assets.tokenized import make_dataset
from runlora_nb.assets.zoo import load_model
from runlora_nb.integrations import adapter_checkpoints
from runlora_nb.integrations.adapters import load_adapter
from runlora_nb.integrations.inject import apply_runlora, get_peft_model
from runlora_nb.integrations.trainer_checkpoints import is_adapter_checkpoint

STEPS = 4


def _model():
    torch.manual_seed(0)  # the same base and the same adapter init in every call
    model, tok = load_model("tiny-llama")
    apply_runlora(model, r=4, alpha=8, dropout=0.0, target_modules="all-linear")
    return model, tok


def _trainer(out, model, tok, hooks=True):
    from transformers import Trainer, TrainingArguments

    args = TrainingArguments(
        output_dir=str(out),
        max_steps=STEPS,
        per_device_train_batch_size=2,
        learning_rate=1e-2,  # large enough that two steps more or less move the adapter far past tolerance
        logging_steps=1,
        save_strategy="steps",
        save_steps=2,
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
        seed=0,
    )
    train = Rows(make_dataset("sonnets", tok, 32, "train"), 16)
    trainer = Trainer(model=model, args=args, train_dataset=train, processing_class=tok)
    return adapter_checkpoints(trainer) if hooks else trainer


def _adapter(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def _logits(model, tok):
    ids = tok("Shall I compare thee to a summer's day?", return_tensors="pt")["input_ids"]
    model.eval()
    with torch.no_grad():
        return model(input_ids=ids).logits


def _bytes(folder):
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def test_checkpoints_hold_the_adapter_not_the_base(tmp_path):
    model, tok = _model()
    _trainer(tmp_path / "out", model, tok).train()
    base_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    for step in (2, 4):
        ckpt = tmp_path / "out" / f"checkpoint-{step}"
        names = {p.name for p in ckpt.iterdir()}
        assert {"adapter_config.json", "adapter_model.safetensors"} <= names
        assert not names & {"model.safetensors", "pytorch_model.bin", "model.safetensors.index.json"}
        assert {"optimizer.pt", "scheduler.pt", "rng_state.pth", "trainer_state.json"} <= names  # for resume
        assert is_adapter_checkpoint(ckpt)
        weights = (ckpt / "adapter_model.safetensors").stat().st_size
        assert weights < 0.2 * base_bytes, (weights, base_bytes)
    # save_model writes the same kind of folder (with the tokenizer), and it loads back into a fresh model
    trainer_dir = tmp_path / "final"
    _trainer(tmp_path / "out2", model, tok).save_model(str(trainer_dir))
    assert is_adapter_checkpoint(trainer_dir) and (trainer_dir / "tokenizer_config.json").exists()
    fresh, _ = load_model("tiny-llama")
    load_adapter(fresh, trainer_dir)
    torch.testing.assert_close(_logits(fresh, tok), _logits(model, tok), rtol=1e-5, atol=1e-5)


def test_full_checkpoints_without_the_hooks(tmp_path):
    """The contrast the hooks remove: a plain Trainer writes the base model into every checkpoint."""
    model, tok = _model()
    trainer = _trainer(tmp_path / "out", model, tok, hooks=False)
    trainer.args.max_steps = 2
    trainer.train()
    ckpt = tmp_path / "out" / "checkpoint-2"
    assert (ckpt / "model.safetensors").exists() and not is_adapter_checkpoint(ckpt)


def test_peft_loads_a_checkpoint_with_the_trained_logits(tmp_path):
    model, tok = _model()
    _trainer(tmp_path / "out", model, tok).train()
    base, _ = load_model("tiny-llama")
    loaded = peft.PeftModel.from_pretrained(base, str(tmp_path / "out" / f"checkpoint-{STEPS}"))
    want = _logits(model, tok)
    assert not torch.allclose(want, _logits(load_model("tiny-llama")[0], tok), atol=1e-4)  # it did train
    torch.testing.assert_close(_logits(loaded, tok), want, rtol=1e-5, atol=1e-5)


def test_resume_from_a_checkpoint_equals_the_uninterrupted_run(tmp_path):
    model, tok = _model()
    _trainer(tmp_path / "full", model, tok).train()
    want = _adapter(model)

    resumed, tok = _model()
    trainer = _trainer(tmp_path / "resumed", resumed, tok)
    trainer.train(resume_from_checkpoint=str(tmp_path / "full" / "checkpoint-2"))
    assert trainer.state.global_step == STEPS
    got = _adapter(resumed)
    assert got.keys() == want.keys() and len(got) > 0
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-5, atol=1e-6, msg=name)


def test_resume_true_picks_the_last_adapter_checkpoint(tmp_path):
    model, tok = _model()
    trainer = _trainer(tmp_path / "out", model, tok)
    trainer.args.max_steps = 2
    trainer.train()
    want = _adapter(model)
    again, tok = _model()
    trainer = _trainer(tmp_path / "out", again, tok)
    trainer.args.max_steps = 2  # nothing left to train: the weights are exactly the checkpoint's
    trainer.train(resume_from_checkpoint=True)
    for name, p in _adapter(again).items():
        torch.testing.assert_close(p, want[name], rtol=0, atol=0, msg=name)


def test_load_best_model_at_end_reads_the_best_adapter_checkpoint(tmp_path):
    model, tok = _model()
    trainer = _trainer(tmp_path / "out", model, tok)
    trainer.eval_dataset = Rows(make_dataset("sonnets", tok, 32, "validation"), 4)
    args = trainer.args
    args.eval_strategy, args.eval_steps, args.load_best_model_at_end = "steps", 2, True
    args.metric_for_best_model, args.greater_is_better = "eval_loss", False
    # the best checkpoint is forced to be step 2, so the loaded weights differ from the last step's
    evals = iter([1.0, 2.0])
    trainer.callback_handler.callbacks.insert(0, _FakeLoss(evals))
    trainer.train()
    assert trainer.state.best_model_checkpoint.endswith("checkpoint-2")
    best, _ = load_model("tiny-llama")
    apply_runlora(best, r=4, alpha=8, dropout=0.0, target_modules="all-linear")
    load_adapter(best, tmp_path / "out" / "checkpoint-2")
    want, last = _adapter(best), _adapter(load_adapter(_model()[0], tmp_path / "out" / "checkpoint-4"))
    got = _adapter(model)
    assert any(not torch.allclose(want[k], last[k]) for k in want)  # step 2 and step 4 differ
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=0, atol=0, msg=name)


class _FakeLoss:
    """Overwrites each evaluation's loss with the next value of ``values`` (a callback, before the others)."""

    def __init__(self, values):
        self.values = values

    def __getattr__(self, name):
        if name.startswith("on_"):
            return lambda *a, **k: None
        raise AttributeError(name)

    def on_evaluate(self, args, state, control, metrics=None, **kw):
        metrics["eval_loss"] = next(self.values)


def test_sft_trainer_checkpoints_are_adapters_and_resume(tmp_path):
    datasets = pytest.importorskip("datasets", reason="trl's dependency; in the dev extra")
    from trl import SFTConfig, SFTTrainer

    def run(out, resume=None):
        model, tok = _model()
        if tok.pad_token is None:
            tok.pad_token = tok.eos_token
        texts = [f"Line {k}: shall I compare thee to a summer's day? Thou art more lovely." for k in range(8)]
        # bf16=False: SFTConfig's default bf16 autocast stays wrapped around model.forward after training
        args = SFTConfig(
            output_dir=str(out), max_steps=STEPS, per_device_train_batch_size=2, learning_rate=1e-2,
            logging_steps=1, save_strategy="steps", save_steps=2, report_to=[], use_cpu=True, max_length=32,
            disable_tqdm=True, seed=0, bf16=False,
        )  # fmt: skip
        data = datasets.Dataset.from_dict({"text": texts})
        trainer = adapter_checkpoints(
            SFTTrainer(model=model, args=args, train_dataset=data, processing_class=tok)
        )
        trainer.train(resume_from_checkpoint=resume)
        return model, tok

    model, tok = run(tmp_path / "full")
    ckpt = tmp_path / "full" / "checkpoint-2"
    assert is_adapter_checkpoint(ckpt) and not (ckpt / "model.safetensors").exists()
    loaded = peft.PeftModel.from_pretrained(
        load_model("tiny-llama")[0], str(tmp_path / "full" / "checkpoint-4")
    )
    torch.testing.assert_close(_logits(loaded, tok), _logits(model, tok), rtol=1e-5, atol=1e-5)
    resumed, _ = run(tmp_path / "resumed", resume=str(ckpt))
    want = _adapter(model)
    for name, p in _adapter(resumed).items():
        torch.testing.assert_close(p, want[name], rtol=1e-5, atol=1e-6, msg=name)


def test_refusals_and_no_ops(tmp_path):
    from transformers import Trainer, TrainingArguments

    with pytest.raises(TypeError, match="needs a transformers Trainer"):
        adapter_checkpoints(object())
    args = TrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True)
    plain, _ = load_model("tiny-llama")
    with pytest.raises(TypeError, match=r"no RunLoRA layers.*apply_runlora"):
        adapter_checkpoints(Trainer(model=plain, args=args))
    # a PeftModel is saved as an adapter by the Trainer already: left as it is
    pm = get_peft_model(load_model("tiny-llama")[0], peft.LoraConfig(r=4, target_modules=["q_proj"]))
    trainer = Trainer(model=pm, args=args)
    save = trainer._save
    assert adapter_checkpoints(trainer) is trainer and trainer._save == save
    # twice is once
    model, _ = _model()
    trainer = adapter_checkpoints(Trainer(model=model, args=args))
    hook = trainer._save
    assert adapter_checkpoints(trainer)._save is hook
