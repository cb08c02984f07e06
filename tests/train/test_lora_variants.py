"""LoRA+ (a larger learning rate for B) and rsLoRA (alpha / sqrt(r)) as run settings and search-space options."""

from __future__ import annotations

import math

import optuna
import pytest

from runlora_nb.integrations.inject import runlora_layers
from runlora_nb.ledger import SearchSpace
from runlora_nb.train import FineTuneConfig, FineTuner
from runlora_nb.train.setup import make_optimizer

QUICK = {"model": "tiny-llama", "seq_len": 32, "batch_size": 4, "eval_batches": 1, "eval_interval": 0,
         "sample_prompts": (), "dropout": 0.0, "chain": "flops", "lr": 1e-3, "warmup_steps": 0}  # fmt: skip


def test_lora_plus_puts_b_in_its_own_group_at_ratio_times_lr(tmp_path):
    tuner = FineTuner(FineTuneConfig(**QUICK, steps=2, lora_plus_ratio=16.0, output_dir=str(tmp_path / "a")))
    tuner.prepare()
    opt = make_optimizer(tuner.model, tuner.config)
    a_group, b_group = opt.param_groups
    assert a_group["lr"] == 1e-3 and b_group["lr"] == pytest.approx(16e-3)
    names = {id(p): n for n, p in tuner.model.named_parameters()}
    assert all("lora_B" in names[id(p)] for p in b_group["params"])
    assert all("lora_B" not in names[id(p)] for p in a_group["params"]) and a_group["params"]
    plain = FineTuner(FineTuneConfig(**QUICK, steps=2, output_dir=str(tmp_path / "b"))).run()
    plus = tuner.run()
    assert plain.steps[0].loss == pytest.approx(plus.steps[0].loss)  # same start (B = 0 either way)
    assert plus.steps[1].loss != pytest.approx(plain.steps[1].loss, rel=1e-6)  # B moved 16× faster
    with pytest.raises(ValueError, match="lora_plus_ratio must be > 0"):
        FineTuneConfig(lora_plus_ratio=0.0)


@pytest.mark.parametrize("backend", ["runlora", "peft"])
def test_rslora_scales_by_alpha_over_sqrt_r(backend, tmp_path):
    cfg = FineTuneConfig(**QUICK, steps=1, r=16, alpha=8, use_rslora=True, backend=backend,
                         output_dir=str(tmp_path))  # fmt: skip
    tuner = FineTuner(cfg)
    tuner.prepare()
    if backend == "runlora":
        scales = {layer.scaling for _, layer in runlora_layers(tuner.model)}
    else:
        scales = {
            m.scaling["default"]
            for m in tuner.model.modules()
            if isinstance(getattr(m, "scaling", None), dict)
        }
    assert scales and all(s == pytest.approx(8 / math.sqrt(16)) for s in scales)


def test_the_search_space_varies_lora_plus_and_rslora():
    space = SearchSpace(r=[4, 8], use_rslora=[False, True], lora_plus_ratio=(2.0, 32.0, True))
    assert set(space.varying()) == {"r", "use_rslora", "lora_plus_ratio"}
    picked = space.suggest(optuna.trial.FixedTrial({"r": 8, "use_rslora": True, "lora_plus_ratio": 16.0}))
    assert (picked["use_rslora"], picked["lora_plus_ratio"]) == (True, 16.0)
    FineTuneConfig(**{k: v for k, v in picked.items()})  # every drawn value is a valid run setting
    assert SearchSpace().suggest(optuna.trial.FixedTrial({}))["lora_plus_ratio"] is None
    with pytest.raises(ValueError, match="lora_plus_ratio"):
        SearchSpace(lora_plus_ratio=-1.0)
    with pytest.raises(ValueError, match="use_rslora"):
        SearchSpace(use_rslora="yes")


def test_the_sweep_cli_reads_rslora_and_lora_plus_choices():
    from runlora_nb.app.cli import _parser
    from runlora_nb.app.sweep_cli import _space

    args = _parser().parse_args(
        ["sweep", "--study", "s", "--use-rslora", "false,true", "--lora-plus-ratio", "4,16"]
    )
    space = _space(args)
    assert space.use_rslora == [False, True] and space.lora_plus_ratio == [4.0, 16.0]
    with pytest.raises(ValueError, match="not true or false"):
        _space(_parser().parse_args(["sweep", "--study", "s", "--use-rslora", "yes"]))
