"""FineTuneConfig's checks that need no training: the rank's type and seq_len against the model's positions."""

from __future__ import annotations

import json

import pytest

from runlora_nb.assets import zoo
from runlora_nb.tuning import FineTuneConfig


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
    from runlora_nb.tuning.config import load_config, save_config

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
