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

    # "# ... train ..." stands for training: move every B off zero (as training does), or a broken save/load
    # would reload an adapter equal to no adapter and still pass
    assert "# ... train ..." in plain_block
    trained = plain_block.replace(
        "# ... train ...",
        "import torch\n"
        "torch.manual_seed(0)\n"
        "with torch.no_grad():\n"
        "    for _n, _p in plain_model.named_parameters():\n"
        "        if _p.requires_grad:\n"
        "            _p.add_(torch.randn_like(_p) * 0.05)\n",
    )
    namespace = {"plain_model": load_model("tiny-llama")[0]}
    exec(compile(trained, "README.md", "exec"), namespace)
    plain = namespace["plain_model"].eval()
    base = load_model("tiny-llama")[0].eval()
    saved = peft.PeftModel.from_pretrained(load_model("tiny-llama")[0], tmp_path / "my-adapter").eval()
    with torch.no_grad():
        tuned, reloaded, untouched = (m(input_ids=ids).logits for m in (plain, saved, base))
    assert not torch.allclose(tuned, untouched, atol=1e-3)  # the adapter changes the model
    assert torch.allclose(reloaded, tuned, atol=1e-5)  # and PEFT reloads exactly that change


def test_layer_example_runs():
    from torch import nn

    from runlora_nb import RunLoRALinear

    layer = RunLoRALinear(nn.Linear(1024, 1024), r=16, alpha=32, dropout=0.1)
    plan = layer.plan(2048)
    assert plan.fwd and plan.reason


def test_the_command_lists_export_line_shows_force_and_parses():
    """The command list showed `export` without the --force the CLI accepts."""
    import shlex

    from runlora_nb.app.cli import _parser

    lines = [
        ln.strip() for ln in README.read_text().splitlines() if ln.strip().startswith("runlora-nb export ")
    ]
    assert lines and all("[--force]" in ln for ln in lines)
    for line in lines:
        argv = shlex.split(line.split("  #")[0].replace("[", "").replace("]", ""))[1:]
        assert _parser().parse_args(argv).force is True
