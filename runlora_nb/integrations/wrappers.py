"""Models inside launchers: unwrap DDP / ``torch.compile`` / accelerate containers, tell rank 0, gather FSDP2 shards.

* :func:`unwrap_model` strips ``DistributedDataParallel`` / ``DataParallel`` (``.module``), ``torch.compile``
  (``_orig_mod``) and what ``accelerate.Accelerator.prepare`` adds (``accelerate.utils.extract_model_from_parallel``),
  so module paths and parameter names are the transformers model's again. ``fully_shard`` (FSDP2) does not wrap: it
  swaps the model's class in place and turns its parameters into ``DTensor`` shards, so it needs no unwrapping.
* :func:`is_main_process` / :func:`barrier` work with and without an initialized ``torch.distributed`` group
  (without one there is a single process: it is the main one and a barrier returns at once).
* :func:`full_tensors` / :func:`full_adapter_state` gather ``DTensor`` shards into whole tensors on every rank (a
  collective: every rank must call it, in the same order); :func:`copy_full_` writes a whole tensor back into a
  parameter, sharded or not, without communication.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.distributed as dist
from torch import nn

__all__ = [
    "barrier",
    "copy_full_",
    "full_adapter_state",
    "full_tensors",
    "is_distributed",
    "is_main_process",
    "is_sharded",
    "unwrap_model",
]


def _dtensor_type() -> type | None:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # torch built without distributed
        return None
    return DTensor


def _strip_once(model: nn.Module) -> nn.Module:
    if isinstance(model, nn.parallel.DistributedDataParallel | nn.DataParallel):
        return model.module
    orig = model.__dict__.get("_orig_mod") or model._modules.get("_orig_mod")
    if isinstance(orig, nn.Module):  # torch.compile's OptimizedModule
        return orig
    try:
        from accelerate.utils import extract_model_from_parallel
    except ImportError:
        return model
    # keep_fp32_wrapper=True: never edits the model's forward (a prepared model keeps its autocast)
    return extract_model_from_parallel(model, keep_fp32_wrapper=True, keep_torch_compile=False)


def unwrap_model(model: nn.Module) -> nn.Module:
    """The model inside DDP / DataParallel / ``torch.compile`` / accelerate containers (nested ones too).

    Args:
        model: a model, possibly wrapped (``DistributedDataParallel(model)``, ``torch.compile(model)``,
            ``Accelerator().prepare(model)``); an FSDP2 (``fully_shard``) model is returned as it is.

    Returns:
        The innermost module; the same object when nothing wraps ``model``.

    Raises:
        TypeError: ``model`` is not an ``nn.Module``.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(
            f"unwrap_model: expected a torch.nn.Module, got {type(model).__name__}; pass the model (or its "
            "DDP / accelerate wrapper), not its state_dict or output"
        )
    for _ in range(16):  # containers nest only a few deep; the bound stops a self-referencing wrapper
        inner = _strip_once(model)
        if inner is model:
            return model
        model = inner
    return model


def is_distributed() -> bool:
    """True when a ``torch.distributed`` process group is initialized in this process."""
    return dist.is_available() and dist.is_initialized()


def is_main_process() -> bool:
    """True on global rank 0, and in any process without an initialized process group."""
    return not is_distributed() or dist.get_rank() == 0


def barrier() -> None:
    """Wait for every rank of the default process group; returns at once without one."""
    if is_distributed():
        dist.barrier()


def is_sharded(model: nn.Module) -> bool:
    """True when any parameter of ``model`` is a ``DTensor`` (``fully_shard`` / tensor parallel)."""
    dtensor = _dtensor_type()
    return dtensor is not None and any(isinstance(p, dtensor) for p in unwrap_model(model).parameters())


@torch.no_grad()
def full_tensors(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Whole, detached CPU copies of ``tensors``, gathering ``DTensor`` shards.

    A collective when any tensor is a ``DTensor``: every rank must call it with the same keys in the same order
    (the module order of the same model is). Plain tensors are copied without communication.

    Args:
        tensors: name → tensor (a parameter, a ``DTensor`` shard of one, or a plain tensor).

    Returns:
        name → CPU tensor of the full (global) shape, contiguous, in the same key order.
    """
    dtensor = _dtensor_type()
    out = {}
    for name, t in tensors.items():
        if dtensor is not None and isinstance(t, dtensor):
            t = t.full_tensor()  # all-gather of the shards; (global shape)
        out[name] = t.detach().to("cpu", copy=True).contiguous()
    return out


def full_adapter_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The trainable parameters of ``model`` as whole CPU tensors, under the unwrapped model's names.

    Only what requires grad is gathered (the adapters and ``modules_to_save``), not the frozen base: cheaper than
    ``torch.distributed.checkpoint.state_dict.get_model_state_dict(model, options=StateDictOptions(
    full_state_dict=True, cpu_offload=True))``, which gathers every weight. A collective under FSDP2: call it on
    every rank.

    Args:
        model: a model, wrapped (DDP, accelerate, ``torch.compile``) or sharded (``fully_shard``) or neither.

    Returns:
        name → CPU tensor, e.g. ``"model.layers.0.self_attn.q_proj.lora_A.weight"`` → (r, i).
    """
    inner = unwrap_model(model)
    return full_tensors({n: p for n, p in inner.named_parameters() if p.requires_grad})


@torch.no_grad()
def copy_full_(param: torch.Tensor, full: torch.Tensor) -> None:
    """Copy the whole tensor ``full`` into ``param``, in place; a ``DTensor`` takes its own shard of it.

    No communication: every rank must pass the same ``full`` (as when all ranks read one file).

    Args:
        param: the destination, a plain tensor or a ``DTensor`` of global shape ``full.shape``.
        full: the whole value (any device and dtype; converted to the parameter's).

    Raises:
        ValueError: the shapes differ.
    """
    if tuple(param.shape) != tuple(full.shape):
        raise ValueError(
            f"copy_full_: a tensor of shape {tuple(full.shape)} cannot fill a parameter of shape "
            f"{tuple(param.shape)}; load a file saved from a model of the same configuration"
        )
    dtensor = _dtensor_type()
    if dtensor is not None and isinstance(param, dtensor):
        from torch.distributed.tensor import distribute_tensor

        local = full.to(dtype=param.dtype, device=param.to_local().device)
        # src_data_rank=None: each rank cuts its shard from its own copy (no scatter)
        shard = distribute_tensor(local, param.device_mesh, param.placements, src_data_rank=None)
        param.to_local().copy_(shard.to_local())
        return
    param.copy_(full.to(dtype=param.dtype, device=param.device))
