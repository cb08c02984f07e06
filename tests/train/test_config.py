"""FineTuneConfig's checks that need no training: the rank's type and seq_len against the model's positions."""

from __future__ import annotations

import json

import pytest

from runlora_nb.assets import zoo
from runlora_nb.train import FineTuneConfig


@pytest.mark.parametrize("bad", [2.5, True, 0, "8"])
def test_rank_must_be_a_positive_int(bad):
    with pytest.raises(ValueError, match=r"r \(the LoRA rank\) must be a positive int"):
        FineTuneConfig(model="tiny-llama", r=bad)


@pytest.mark.parametrize("name", ["tiny-gpt2", "tiny-opt", "tiny-llama", "tiny-roberta"])
def test_seq_len_beyond_the_positions_is_refused_up_front(name):
    with pytest.raises(
        ValueError, match=rf"seq_len=1024 exceeds the 512 positions of model '{name}'.*seq_len <= 512"
    ):
        FineTuneConfig(model=name, seq_len=1024)
    assert FineTuneConfig(model=name, seq_len=512).seq_len == 512


def test_positions_of_a_local_folder_and_of_configs(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2", "n_positions": 64}))
    assert zoo.max_positions(tmp_path) == 64
    with pytest.raises(ValueError, match="64 positions"):
        FineTuneConfig(model=str(tmp_path), seq_len=128)
    roberta = {"model_type": "roberta", "max_position_embeddings": 514, "pad_token_id": 1}
    assert zoo.positions_limit(roberta) == 512
    assert zoo.max_positions(tmp_path / "missing") is None
    assert zoo.max_positions("some/hub-id") is None


def test_model_race_refuses_a_sequence_past_the_positions():
    from runlora_nb.measure import race_model

    with pytest.raises(
        ValueError, match=r"race_model: seq_len=1024 exceeds the 512 positions of model 'tiny-gpt2'"
    ):
        race_model("tiny-gpt2", batch=1, seq=1024, reps=1)


def test_yaml_config_round_trips_and_names_bad_fields(tmp_path):
    from runlora_nb.train.config import load_config, save_config

    cfg = FineTuneConfig(model="tiny-llama", steps=3, r=4, lr=3e-3, targets=["q_proj", "v_proj"], seq_len=32)
    assert load_config(save_config(cfg, tmp_path / "run.yaml")) == cfg
    assert load_config(tmp_path / "run.yaml", runs_dir=str(tmp_path), output_dir=None).runs_dir == str(
        tmp_path
    )

    (tmp_path / "typo.yaml").write_text("model: tiny-llama\nrank: 8\n")
    with pytest.raises(ValueError, match=r"unknown field\(s\) rank; valid fields: model, dataset.* r, alpha"):
        load_config(tmp_path / "typo.yaml")
    (tmp_path / "list.yaml").write_text("- model\n")
    with pytest.raises(ValueError, match="holds a list, not a mapping"):
        load_config(tmp_path / "list.yaml")
    (tmp_path / "badlr.yaml").write_text("model: tiny-llama\nlr: -1\n")
    with pytest.raises(ValueError, match="lr must be > 0"):
        load_config(tmp_path / "badlr.yaml")
    with pytest.raises(ValueError, match="is not a file"):
        load_config(tmp_path / "missing.yaml")


def test_yaml_numbers_written_as_text_are_parsed(tmp_path):
    from runlora_nb.train.config import load_config

    # PyYAML (YAML 1.1) reads 3e-4 without a dot as the string '3e-4'
    (tmp_path / "run.yaml").write_text("model: tiny-llama\nlr: 3e-4\nweight_decay: 1e-2\nsteps: '5'\n")
    cfg = load_config(tmp_path / "run.yaml")
    assert cfg.lr == 3e-4 and cfg.weight_decay == 1e-2 and cfg.steps == 5 and isinstance(cfg.steps, int)


@pytest.mark.parametrize(
    ("line", "field", "kind"),
    [
        ("lr: fast", "lr", "a number"),
        ("alpha: [1]", "alpha", "a number"),
        ("steps: many", "steps", "an integer"),
    ],
)
def test_yaml_bad_numbers_name_the_field_value_and_type(tmp_path, line, field, kind):
    from runlora_nb.train.config import load_config

    (tmp_path / "run.yaml").write_text(f"model: tiny-llama\n{line}\n")
    with pytest.raises(ValueError, match=rf"{field} must be {kind}, got .* \((str|list)\)"):
        load_config(tmp_path / "run.yaml")


@pytest.mark.parametrize("field", ["steps", "batch_size", "seq_len", "eval_interval", "checkpoint_every"])
def test_integer_fields_refuse_fractions(field):
    with pytest.raises(ValueError, match=rf"{field} must be an integer, got 40.5 \(float\)"):
        FineTuneConfig(model="tiny-llama", **{field: 40.5})
    cfg = FineTuneConfig(model="tiny-llama", **{field: 40.0})  # an integral float is that integer
    assert getattr(cfg, field) == 40 and isinstance(getattr(cfg, field), int)


def test_yaml_fractional_steps_are_refused(tmp_path):
    from runlora_nb.train.config import load_config

    (tmp_path / "run.yaml").write_text("model: tiny-llama\nsteps: 2.5\n")
    with pytest.raises(ValueError, match=r"steps must be an integer, got 2.5"):
        load_config(tmp_path / "run.yaml")
    (tmp_path / "run.yaml").write_text("model: tiny-llama\nsteps: 2.0\nr: 4.0\n")
    cfg = load_config(tmp_path / "run.yaml")
    assert (cfg.steps, cfg.r) == (2, 4) and isinstance(cfg.steps, int) and isinstance(cfg.r, int)
