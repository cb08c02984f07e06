"""The README's code runs as written (on a tiny model standing in for `base_model`)."""

from __future__ import annotations

import re
from pathlib import Path

import peft
import torch

from runlora_nb.assets.zoo import load_model
from runlora_nb.integrations.inject import runlora_layers

README = Path(__file__).resolve().parents[1] / "README.md"


def _blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), re.S)


def test_adoption_examples_run(tmp_path, monkeypatch):
    peft_block, plain_block = _blocks()[:2]
    monkeypatch.chdir(tmp_path)
    ids = torch.randint(3, 200, (1, 8))

    namespace = {"base_model": load_model("tiny-llama")[0]}
    exec(compile(peft_block, "README.md", "exec"), namespace)
    model = namespace["model"]
    assert any(True for _ in runlora_layers(model))  # converted in place
    model.eval().save_pretrained("my-adapter")  # as the comment promises

    namespace = {"plain_model": load_model("tiny-llama")[0]}
    exec(compile(plain_block, "README.md", "exec"), namespace)
    plain = namespace["plain_model"].eval()
    saved = peft.PeftModel.from_pretrained(load_model("tiny-llama")[0], tmp_path / "my-adapter").eval()
    with torch.no_grad():
        assert torch.allclose(saved(input_ids=ids).logits, plain(input_ids=ids).logits, atol=1e-5)


def test_layer_example_runs():
    from torch import nn

    from runlora_nb import RunLoRALinear

    layer = RunLoRALinear(nn.Linear(1024, 1024), r=16, alpha=32, dropout=0.1)
    plan = layer.plan(2048)
    assert plan.fwd and plan.reason
