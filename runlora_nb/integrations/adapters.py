"""Save and load adapters in PEFT's format (``adapter_config.json`` + ``adapter_model.safetensors``).

Keys are PEFT's: ``base_model.model.<module path>.lora_A.weight`` / ``.lora_B.weight`` (r×i and o×r), plus
``base_model.model.<module>.<param>`` for ``modules_to_save``. A save builds the whole folder aside and swaps it
in (:func:`~runlora_nb.integrations.adapter_files.write_folder`), so a crash never leaves new weights with an old
config. Loading checks everything first — the config field by field, the checksum, finite values, missing or
extra keys, shapes, rank — and copies nothing unless all of it fits; a failed load leaves the model exactly as
it was. Only safetensors is read (never pickle) and no remote code is ever run.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..nn.layer import RunLoRALinear
from .adapter_files import (
    CONFIG_NAME,
    RUN_ADAPTER,
    UNSUPPORTED,
    WEIGHTS_NAME,
    AdapterError,
    read_config,
    read_tensors,
    resolve_folder,
    weights_blob,
    write_file,
    write_folder,
)
from .inject import RunLoRAConfig, apply_runlora, runlora_layers
from .surgery import saved_module_paths, unchanged_on_error
from .wrappers import barrier, copy_full_, full_tensors, is_main_process, unwrap_model

__all__ = ["AdapterError", "load_adapter", "save_adapter"]

_REEXPORTED = (CONFIG_NAME, UNSUPPORTED)  # still importable from here
PREFIX = "base_model.model."
OWNED = {WEIGHTS_NAME, CONFIG_NAME, "adapter_model.bin"}  # replaced by a save, never carried over


@dataclass(frozen=True)
class _Slot:
    """One adapter of the model: where it lives and its two parameters."""

    path: str  # module path relative to the transformers model
    lora_a: nn.Parameter  # (r, i)
    lora_b: nn.Parameter  # (o, r)
    layer: nn.Module


def _inner_model(model: nn.Module) -> tuple[nn.Module, bool]:
    """The transformers model whose module paths appear in keys, and whether ``model`` is a PeftModel.

    DDP, ``torch.compile`` and accelerate containers are looked through (:func:`~.wrappers.unwrap_model`).
    """
    model = unwrap_model(model)
    if hasattr(model, "peft_config") and hasattr(model, "base_model"):
        return model.base_model.model, True
    return model, False


def _slots(model: nn.Module) -> Iterator[_Slot]:
    inner, is_peft = _inner_model(model)
    for path, layer in runlora_layers(inner):
        if isinstance(layer, RunLoRALinear):
            yield _Slot(path, layer.lora_A.weight, layer.lora_B.weight, layer)
        else:  # a PEFT layer converted by from_peft: its single active adapter
            name = next(a for a in layer.active_adapters if a in layer.lora_A)
            yield _Slot(path, layer.lora_A[name].weight, layer.lora_B[name].weight, layer)
    if is_peft:
        from peft.tuners.lora import LoraLayer

        for path, layer in inner.named_modules():
            if (
                isinstance(layer, LoraLayer)
                and not hasattr(layer, "runlora_info")
                and hasattr(layer, "lora_A")
            ):
                name = next((a for a in layer.active_adapters if a in layer.lora_A), None)
                if name is not None and isinstance(layer.lora_A[name], nn.Linear):
                    yield _Slot(path, layer.lora_A[name].weight, layer.lora_B[name].weight, layer)


def _saved_modules(model: nn.Module, cfg: RunLoRAConfig | None) -> dict[str, torch.Tensor]:
    if cfg is None or not cfg.modules_to_save:
        return {}
    out = {}
    for path in saved_module_paths(model, cfg.modules_to_save):
        for pname, p in model.get_submodule(path).state_dict(keep_vars=True).items():
            out[f"{PREFIX}{path}.{pname}"] = p
    return out


def _peft_saved_modules(model: nn.Module) -> dict[str, torch.Tensor]:
    """PEFT's ``ModulesToSaveWrapper`` copies of the active adapter, under the keys PEFT saves them with."""
    from peft.utils import ModulesToSaveWrapper

    inner, _ = _inner_model(model)
    active = getattr(model, "active_adapter", "default")
    out = {}
    for path, mod in inner.named_modules():
        if isinstance(mod, ModulesToSaveWrapper):
            state = mod.state_dict(keep_vars=True)
            for saved, live in mod.adapter_state_dict_load_map(active).items():
                out[f"{PREFIX}{path}.{saved}"] = state[live]
    return out


def _expected(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every key the adapter file must hold, mapped to the model tensor it fills."""
    keys: dict[str, torch.Tensor] = {}
    for slot in _slots(model):
        keys[f"{PREFIX}{slot.path}.lora_A.weight"] = slot.lora_a
        keys[f"{PREFIX}{slot.path}.lora_B.weight"] = slot.lora_b
    inner, is_peft = _inner_model(model)
    if is_peft:
        keys.update(_peft_saved_modules(model))
    else:
        keys.update(_saved_modules(inner, getattr(inner, "runlora_config", None)))
    return keys


def _peft_config_dict(model: nn.Module, cfg: RunLoRAConfig) -> dict:
    from peft import LoraConfig

    targets = cfg.target_modules
    if targets is None or isinstance(targets, str):
        targets = list(cfg.targets)  # defaults, "all-linear" and regexes are saved resolved, as PEFT does
    lcfg = LoraConfig(
        r=cfg.r,
        lora_alpha=cfg.alpha,
        lora_dropout=cfg.dropout,
        target_modules=list(targets),
        use_rslora=cfg.use_rslora,
        modules_to_save=list(cfg.modules_to_save) or None,
        task_type=cfg.task_type,
        fan_in_fan_out=cfg.fan_in_fan_out,
        base_model_name_or_path=cfg.base_model_name_or_path,
        bias="none",
    )
    data = lcfg.to_dict()
    for k, v in list(data.items()):
        if isinstance(v, set):
            data[k] = sorted(v)
    data["inference_mode"] = True
    return data


def save_adapter(model: nn.Module, directory: str | os.PathLike) -> Path:
    """Write the model's adapters in PEFT's format.

    The folder is built in a temporary sibling and swapped in by renames: a crash at any moment leaves the old
    folder or the new one, whole. Other files in an existing folder (a tokenizer, a README) are kept.

    Under ``torch.distributed`` every rank must call it (sharded adapter tensors are gathered); only rank 0
    writes, and every rank returns after the folder is complete (a barrier).

    Args:
        model: a model prepared by :func:`~runlora_nb.apply_runlora`, or a PEFT model (converted or not);
            it may be wrapped in ``DistributedDataParallel``, ``torch.compile`` or ``Accelerator.prepare``.
        directory: created if needed; an existing adapter there is replaced.

    Returns:
        The directory.

    Raises:
        AdapterError: the model has no adapters, or ``directory`` is a file.
    """
    model = unwrap_model(model)
    inner, is_peft = _inner_model(model)
    if is_peft:
        if is_main_process():
            write_folder(directory, lambda tmp: _fill_peft(model, tmp), OWNED)
        barrier()
        return Path(directory)
    cfg: RunLoRAConfig | None = getattr(inner, "runlora_config", None)
    tensors = full_tensors(_expected(inner))  # a collective when FSDP2 shards the adapters
    if cfg is None or not tensors:
        raise AdapterError(
            f"save_adapter: {type(model).__name__} has no RunLoRA adapters; call apply_runlora(model) or "
            "from_peft(peft_model) first"
        )

    def fill(tmp: Path) -> None:
        write_file(tmp / WEIGHTS_NAME, weights_blob(tensors))
        text = json.dumps(_peft_config_dict(inner, cfg), indent=2, sort_keys=True)
        write_file(tmp / CONFIG_NAME, text.encode("utf-8"))

    out = write_folder(directory, fill, OWNED) if is_main_process() else Path(directory)
    barrier()
    return out


def _fill_peft(model: nn.Module, tmp: Path) -> None:
    """PEFT writes the folder; its weights files are rewritten with our checksum in the metadata."""
    from safetensors import safe_open
    from safetensors.torch import load

    model.save_pretrained(tmp)
    for path in tmp.rglob(WEIGHTS_NAME):  # adapters other than "default" go in sub-folders
        with safe_open(path, "pt") as fh:
            meta = fh.metadata() or {}
        write_file(path, weights_blob(load(path.read_bytes()), meta))


def load_adapter(model: nn.Module, directory: str | os.PathLike) -> nn.Module:
    """Load adapters saved by PEFT or by runlora_nb into ``model``, all or nothing.

    A model without adapters gets them first (:func:`~runlora_nb.apply_runlora` with the saved r, alpha,
    dropout, targets and modules_to_save; names the model lacks are skipped, as PEFT does for its seq-cls
    ``["classifier", "score"]``). A model that has them — RunLoRA or PEFT — must match: same modules, same r;
    its alpha / rsLoRA / dropout become the file's. On any failure the model is left exactly as it was.

    Args:
        model: a transformers model, with or without RunLoRA adapters, or a PEFT model; it may be wrapped in
            ``DistributedDataParallel``, ``torch.compile`` or ``Accelerator.prepare`` (every rank loads the file).
        directory: holds ``adapter_config.json`` and ``adapter_model.safetensors``; or a run folder of the
            ledger, whose ``adapter/`` subfolder is read.

    Returns:
        The same model (for a model without adapters, now with them).

    Raises:
        AdapterError: missing, corrupt or truncated files; a checksum mismatch or NaN/inf tensors; a malformed
            config field; unsupported PEFT features; missing or extra keys; wrong shapes or rank — the message
            names each file, field or module, and nothing is loaded.
    """
    directory = resolve_folder(Path(directory).expanduser())
    if not (directory / CONFIG_NAME).exists() and (directory / RUN_ADAPTER).is_dir():
        # a run folder of the ledger (what `runs list` prints): its adapter is the adapter/ inside
        directory = resolve_folder(directory / RUN_ADAPTER)
    cfg = read_config(directory)
    tensors = read_tensors(directory)
    outer, model = model, unwrap_model(model)
    inner, is_peft = _inner_model(model)
    with unchanged_on_error(inner):  # a failure below leaves the model as it was (no half-injected layers)
        if not is_peft and not any(True for _ in runlora_layers(inner)):
            # PEFT's rule: names the model lacks are skipped (its seq-cls task lists both "classifier" and "score")
            saved = [n for n in cfg["modules_to_save"] if saved_module_paths(inner, [n])]
            apply_runlora(
                inner,
                r=cfg["r"],
                alpha=cfg["lora_alpha"],
                dropout=cfg["lora_dropout"],
                target_modules=cfg["target_modules"],
                exclude_modules=cfg["exclude_modules"],
                modules_to_save=saved,
                use_rslora=cfg["use_rslora"],
            )
        expected = _expected(model)
        problems = _compare(expected, tensors)
        if problems:
            shown = "\n  ".join(problems[:12]) + (
                f"\n  … and {len(problems) - 12} more" if len(problems) > 12 else ""
            )
            raise AdapterError(
                f"load_adapter: {directory} does not fit {type(model).__name__}; nothing was loaded:\n  {shown}"
            )
        ready = {k: tensors[k].to(dtype=p.dtype) for k, p in expected.items()}
    with torch.no_grad():
        for key, param in expected.items():
            copy_full_(param, ready[key])  # a DTensor shard takes its own part
    _sync_scaling(model, cfg)
    return outer


def _compare(expected: dict[str, torch.Tensor], tensors: dict[str, torch.Tensor]) -> list[str]:
    problems = []
    for key in sorted(expected.keys() - tensors.keys()):
        problems.append(f"missing in file: {key}")
    for key in sorted(tensors.keys() - expected.keys()):
        problems.append(f"not in model: {key} (no such adapter module)")
    for key in sorted(expected.keys() & tensors.keys()):
        want, got = tuple(expected[key].shape), tuple(tensors[key].shape)
        if want != got:
            module, which = key.removeprefix(PREFIX).rsplit(".", 2)[0], key.rsplit(".", 2)[-2]
            problems.append(
                f"{module}: {which} shape {got} in file, {want} in model{_shape_detail(key, got, want)}"
            )
    return problems


def _shape_detail(key: str, got: tuple[int, ...], want: tuple[int, ...]) -> str:
    """What differs between a saved and an expected LoRA tensor: the rank, or the layer's width.

    ``lora_A`` is (r, in_features) and ``lora_B`` (out_features, r); naming only the ranks would read
    "file has r=16, model has r=16" when it is the layer's width that differs (an adapter of another model).
    """
    if len(got) != 2 or len(want) != 2 or not key.endswith(("lora_A.weight", "lora_B.weight")):
        return ""
    is_a = key.endswith("lora_A.weight")
    file_r, model_r = (got[0], want[0]) if is_a else (got[1], want[1])
    if file_r != model_r:
        return f" (file has r={file_r}, model has r={model_r})"
    dim = "in_features" if is_a else "out_features"
    width_file, width_model = (got[1], want[1]) if is_a else (got[0], want[0])
    return (
        f" (same r={model_r}; the layer's {dim} is {width_file} in file, {width_model} in model: an adapter "
        "saved from another model?)"
    )


def _sync_scaling(model: nn.Module, cfg: dict) -> None:
    """Adopt the saved alpha / rsLoRA / dropout: they are part of what the adapter computes.

    RunLoRA layers and PEFT's LoRA layers (converted or not) alike: PEFT's ``scaling``, ``lora_alpha``,
    ``use_rslora`` and ``lora_dropout`` of the active adapter, and the PeftModel's config, take the file's values.
    """
    inner, _ = _inner_model(model)
    alpha, rs, p = cfg["lora_alpha"], cfg["use_rslora"], cfg["lora_dropout"]
    rcfg = getattr(inner, "runlora_config", None)
    if rcfg is not None:
        rcfg.alpha, rcfg.use_rslora, rcfg.dropout = alpha, rs, p
    for slot in _slots(model):
        layer = slot.layer
        if isinstance(layer, RunLoRALinear):
            layer.alpha, layer.use_rslora, layer.dropout = alpha, rs, p
            layer.scaling = alpha / (layer.r**0.5) if rs else alpha / layer.r
            layer._runlora_specs.clear()
            continue
        name = next(a for a in layer.active_adapters if a in layer.lora_A)  # the adapter _slots filled
        r = layer.r[name]
        layer.lora_alpha[name], layer.use_rslora[name] = alpha, rs
        layer.scaling[name] = alpha / math.sqrt(r) if rs else alpha / r
        if getattr(layer.lora_dropout[name], "p", 0.0) != p:
            layer.lora_dropout[name] = nn.Dropout(p=p) if p > 0 else nn.Identity()
            layer.lora_dropout[name].train(layer.training)
        if hasattr(layer, "_runlora_specs"):
            layer._runlora_specs.clear()
        pcfg = getattr(model, "peft_config", {}).get(name)
        if pcfg is not None:
            pcfg.lora_alpha, pcfg.use_rslora, pcfg.lora_dropout = alpha, rs, p
