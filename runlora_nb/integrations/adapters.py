"""Save and load adapters in PEFT's format (``adapter_config.json`` + ``adapter_model.safetensors``).

Keys are PEFT's: ``base_model.model.<module path>.lora_A.weight`` / ``.lora_B.weight`` (r×i and o×r), plus
``base_model.model.<module>.<param>`` for ``modules_to_save``. Files are written through a temporary file and a
rename, so an interrupted save never leaves a half-written file. Loading checks everything first — missing or
extra keys, shapes, rank, a corrupt or truncated file — and copies nothing unless all of it fits. Only
safetensors is read (never pickle) and no remote code is ever run.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..common.paths import atomic_write_bytes, atomic_write_text
from ..nn.layer import RunLoRALinear
from .inject import RunLoRAConfig, apply_runlora, runlora_layers

__all__ = ["AdapterError", "load_adapter", "save_adapter"]

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PREFIX = "base_model.model."
UNSUPPORTED = {
    "use_dora": "DoRA",
    "lora_bias": "lora_bias",
    "layers_to_transform": "layers_to_transform",
    "rank_pattern": "rank_pattern (per-module ranks)",
    "alpha_pattern": "alpha_pattern (per-module alphas)",
    "target_parameters": "target_parameters",
    "trainable_token_indices": "trainable_token_indices",
}


class AdapterError(ValueError):
    """An adapter directory does not fit the model, or cannot be read."""


@dataclass(frozen=True)
class _Slot:
    """One adapter of the model: where it lives and its two parameters."""

    path: str  # module path relative to the transformers model
    lora_a: nn.Parameter  # (r, i)
    lora_b: nn.Parameter  # (o, r)
    layer: nn.Module


def _inner_model(model: nn.Module) -> tuple[nn.Module, bool]:
    """The transformers model whose module paths appear in keys, and whether ``model`` is a PeftModel."""
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
    if cfg is None:
        return {}
    out = {}
    for name in cfg.modules_to_save:
        for pname, p in model.get_submodule(name).named_parameters():
            out[f"{PREFIX}{name}.{pname}"] = p
    return out


def _expected(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every key the adapter file must hold, mapped to the model tensor it fills."""
    keys: dict[str, torch.Tensor] = {}
    for slot in _slots(model):
        keys[f"{PREFIX}{slot.path}.lora_A.weight"] = slot.lora_a
        keys[f"{PREFIX}{slot.path}.lora_B.weight"] = slot.lora_b
    keys.update(_saved_modules(model, getattr(model, "runlora_config", None)))
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

    Args:
        model: a model prepared by :func:`~runlora_nb.apply_runlora`, or a PEFT model (converted or not).
        directory: created if needed; existing adapter files are replaced atomically.

    Returns:
        The directory.

    Raises:
        AdapterError: the model has no adapters.
    """
    directory = Path(directory)
    inner, is_peft = _inner_model(model)
    if is_peft:
        return _save_peft(model, directory)
    cfg: RunLoRAConfig | None = getattr(inner, "runlora_config", None)
    tensors = _expected(inner)
    if cfg is None or not tensors:
        raise AdapterError(
            f"save_adapter: {type(model).__name__} has no RunLoRA adapters; call apply_runlora(model) or "
            "from_peft(peft_model) first"
        )
    from safetensors.torch import save

    blob = save({k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}, metadata={"format": "pt"})
    atomic_write_bytes(directory / WEIGHTS_NAME, blob)
    atomic_write_text(
        directory / CONFIG_NAME, json.dumps(_peft_config_dict(inner, cfg), indent=2, sort_keys=True)
    )
    return directory


def _save_peft(model: nn.Module, directory: Path) -> Path:
    import tempfile

    directory.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=directory, prefix=".save.") as tmp:
        model.save_pretrained(tmp)
        for name in (WEIGHTS_NAME, CONFIG_NAME, "README.md"):
            src = Path(tmp, name)
            if src.exists():
                os.replace(src, directory / name)
    return directory


def _read_config(directory: Path) -> dict:
    path = directory / CONFIG_NAME
    try:
        cfg = json.loads(path.read_text())
    except FileNotFoundError as err:
        raise AdapterError(
            f"load_adapter: {path} is missing; is {directory} a PEFT adapter directory?"
        ) from err
    except (OSError, ValueError) as err:
        raise AdapterError(f"load_adapter: {path} is not valid JSON ({err}); re-save the adapter") from err
    if not isinstance(cfg, dict) or cfg.get("peft_type", "LORA") != "LORA":
        raise AdapterError(
            f"load_adapter: {path} is not a LoRA adapter config (peft_type={cfg.get('peft_type')!r})"
        )
    used = [label for key, label in UNSUPPORTED.items() if cfg.get(key)]
    if used:
        raise AdapterError(
            f"load_adapter: {path} uses {', '.join(used)}, which runlora_nb does not run; use PEFT"
        )
    return cfg


def _read_tensors(directory: Path) -> dict[str, torch.Tensor]:
    path = directory / WEIGHTS_NAME
    if not path.exists():
        bin_path = directory / "adapter_model.bin"
        hint = (
            " (only a pickle .bin is there: runlora_nb reads safetensors only)" if bin_path.exists() else ""
        )
        raise AdapterError(f"load_adapter: {path} is missing{hint}")
    from safetensors import SafetensorError
    from safetensors.torch import load

    try:
        return load(path.read_bytes())
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        raise AdapterError(
            f"load_adapter: {path} is corrupt or truncated ({err}); nothing was loaded"
        ) from err


def load_adapter(model: nn.Module, directory: str | os.PathLike) -> nn.Module:
    """Load adapters saved by PEFT or by runlora_nb into ``model``, all or nothing.

    A model without adapters gets them first (:func:`~runlora_nb.apply_runlora` with the saved r, alpha,
    dropout, targets and modules_to_save). A model that has them must match: same modules, same r.

    Args:
        model: a transformers model, with or without RunLoRA adapters, or a PEFT model.
        directory: holds ``adapter_config.json`` and ``adapter_model.safetensors``.

    Returns:
        The same model (for a model without adapters, now with them).

    Raises:
        AdapterError: missing, corrupt or truncated files; unsupported PEFT features; missing or extra keys;
            wrong shapes or rank — the message names each module, and nothing is loaded.
    """
    directory = Path(directory)
    cfg = _read_config(directory)
    tensors = _read_tensors(directory)
    inner, is_peft = _inner_model(model)
    if not is_peft and not any(True for _ in runlora_layers(inner)):
        apply_runlora(
            inner,
            r=int(cfg["r"]),
            alpha=cfg.get("lora_alpha", 8),
            dropout=float(cfg.get("lora_dropout", 0.0)),
            target_modules=cfg.get("target_modules"),
            exclude_modules=cfg.get("exclude_modules"),
            modules_to_save=cfg.get("modules_to_save") or [],
            use_rslora=bool(cfg.get("use_rslora", False)),
        )
    expected = _expected(model)
    problems = _compare(expected, tensors, int(cfg["r"]))
    if problems:
        shown = "\n  ".join(problems[:12]) + (
            f"\n  … and {len(problems) - 12} more" if len(problems) > 12 else ""
        )
        raise AdapterError(
            f"load_adapter: {directory} does not fit {type(model).__name__}; nothing was loaded:\n  {shown}"
        )
    with torch.no_grad():
        for key, param in expected.items():
            param.copy_(tensors[key].to(dtype=param.dtype, device=param.device))
    _sync_scaling(model, cfg)
    return model


def _compare(expected: dict[str, torch.Tensor], tensors: dict[str, torch.Tensor], r: int) -> list[str]:
    problems = []
    for key in sorted(expected.keys() - tensors.keys()):
        problems.append(f"missing in file: {key}")
    for key in sorted(tensors.keys() - expected.keys()):
        problems.append(f"not in model: {key} (no such adapter module)")
    for key in sorted(expected.keys() & tensors.keys()):
        want, got = tuple(expected[key].shape), tuple(tensors[key].shape)
        if want != got:
            module = key.removeprefix(PREFIX).rsplit(".", 2)[0]
            model_r = want[0] if key.endswith("lora_A.weight") else want[-1]
            detail = (
                f" (file has r={r}, model has r={model_r})"
                if key.endswith(("lora_A.weight", "lora_B.weight"))
                else ""
            )
            problems.append(
                f"{module}: {key.rsplit('.', 2)[-2]} shape {got} in file, {want} in model{detail}"
            )
    return problems


def _sync_scaling(model: nn.Module, cfg: dict) -> None:
    """Adopt the saved alpha / rsLoRA / dropout: they are part of what the adapter computes."""
    inner, _ = _inner_model(model)
    alpha, rs, p = (
        cfg.get("lora_alpha", 8),
        bool(cfg.get("use_rslora", False)),
        float(cfg.get("lora_dropout", 0.0)),
    )
    for _, layer in runlora_layers(inner):
        if isinstance(layer, RunLoRALinear):
            layer.alpha, layer.use_rslora, layer.dropout = alpha, rs, p
            layer.scaling = alpha / (layer.r**0.5) if rs else alpha / layer.r
            layer._runlora_specs.clear()
    rcfg = getattr(inner, "runlora_config", None)
    if rcfg is not None:
        rcfg.alpha, rcfg.use_rslora, rcfg.dropout = alpha, rs, p
