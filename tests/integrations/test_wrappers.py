"""Adapters through launcher containers: DDP, torch.compile and accelerate wrappers are looked through."""

from __future__ import annotations

import accelerate
import peft
import pytest
import torch
import torch.distributed as dist
from safetensors.torch import load_file
from testutil import rel_err
from torch import nn

from runlora_nb.assets.zoo import load_model
from runlora_nb.integrations.adapters import load_adapter, save_adapter
from runlora_nb.integrations.inject import apply_runlora, merge_and_unload, runlora_layers
from runlora_nb.integrations.wrappers import (
    barrier,
    copy_full_,
    full_adapter_state,
    is_distributed,
    is_main_process,
    is_sharded,
    unwrap_model,
)


def fresh():
    model, _ = load_model("tiny-llama", task="causal-lm")
    return model.eval()


def data():
    ids = torch.randint(3, 200, (2, 10), generator=torch.Generator().manual_seed(1))
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def trained():
    return apply_runlora(fresh(), r=4, alpha=8, init_lora_weights=False).eval()


@pytest.fixture
def one_rank_group(tmp_path):
    """A real gloo process group of one rank, so DistributedDataParallel can wrap a model in this process."""
    assert not dist.is_initialized(), "another test left a process group behind"
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def test_without_a_group_this_process_is_main():
    assert not is_distributed() and is_main_process()
    barrier()  # returns at once


def test_unwrap_strips_nested_containers_and_rejects_non_modules():
    model = trained()
    assert unwrap_model(model) is model
    assert unwrap_model(torch.compile(model)) is model  # OptimizedModule; nothing compiles until called
    with pytest.raises(TypeError, match=r"unwrap_model: expected a torch\.nn\.Module, got OrderedDict"):
        unwrap_model(model.state_dict())
    assert not is_sharded(model)


def test_save_load_merge_through_ddp(tmp_path, one_rank_group):
    model = trained()
    ddp = nn.parallel.DistributedDataParallel(model)
    assert unwrap_model(torch.compile(ddp)) is model
    assert is_distributed() and is_main_process()
    save_adapter(ddp, tmp_path / "via-ddp")
    save_adapter(model, tmp_path / "plain")
    a = load_file(tmp_path / "via-ddp" / "adapter_model.safetensors")
    b = load_file(tmp_path / "plain" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not any(k.startswith("module.") for k in a)  # PEFT's keys, not DDP's

    target = nn.parallel.DistributedDataParallel(apply_runlora(fresh(), r=4, alpha=8))
    assert load_adapter(target, tmp_path / "via-ddp") is target
    with torch.no_grad():
        assert rel_err(target.module(**data()).logits, model(**data()).logits) < 1e-6
        merged = merge_and_unload(target)
        assert merged is target.module and not list(runlora_layers(merged))
        # one fp32 rounding per merged weight: a few ulps relative to the logits
        assert rel_err(merged(**data()).logits, model(**data()).logits) < 1e-5


def test_save_through_accelerate_prepare_loads_in_peft(tmp_path):
    model = trained()
    prepared = accelerate.Accelerator(cpu=True).prepare(model)
    save_adapter(prepared, tmp_path)
    pm = peft.PeftModel.from_pretrained(fresh(), tmp_path).eval()
    with torch.no_grad():
        assert rel_err(pm(**data()).logits, model(**data()).logits) < 1e-6


def test_full_adapter_state_names_and_copy_full_checks_shape():
    model = trained()
    state = full_adapter_state(torch.compile(model))
    names = dict(model.named_parameters())
    assert state and all(
        names[k].requires_grad and torch.equal(v, names[k].detach()) for k, v in state.items()
    )
    key, value = next(iter(state.items()))
    copy_full_(names[key], torch.zeros_like(value))
    assert not names[key].detach().any()
    with pytest.raises(ValueError, match=r"copy_full_: a tensor of shape \(1,\) cannot fill"):
        copy_full_(names[key], torch.zeros(1))
