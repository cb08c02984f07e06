"""Helpers shared by the tests."""

from __future__ import annotations

import functools
import urllib.request

import torch


def rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    """‖got − ref‖ / max(‖ref‖, tiny), in float64."""
    got, ref = got.detach().double(), ref.detach().double()
    return float((got - ref).norm() / ref.norm().clamp_min(1e-30))


@functools.cache
def pypi_reachable() -> bool:
    """True when the package registry answers (tests that fetch from PyPI skip with a reason otherwise)."""
    try:
        with urllib.request.urlopen("https://pypi.org/simple/pip/", timeout=5):
            return True
    except OSError:
        return False


def tuned_llama(r: int = 4):
    """tiny-llama with trained-looking (non-zero) adapters: the tuned model differs from the base."""
    from runlora_nb.assets.zoo import load_model
    from runlora_nb.integrations.inject import apply_runlora, runlora_layers

    model, tok = load_model("tiny-llama")
    apply_runlora(model, r=r, alpha=2 * r, target_modules="all-linear")
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for _, layer in runlora_layers(model):
            layer.lora_B.weight.copy_(torch.randn(layer.lora_B.weight.shape, generator=gen) * 0.05)
    return model.eval(), tok


class Rows(torch.utils.data.Dataset):
    """The rows of a tokenized split as the dicts a Trainer collates."""

    def __init__(self, split, n):
        self.t = {k: v[:n] for k, v in split.tensors.items()}

    def __len__(self):
        return len(self.t["input_ids"])

    def __getitem__(self, i):
        return {k: v[i] for k, v in self.t.items()}
