"""The files of a PEFT-format adapter folder: read and check the config, read and check the weights, write a folder.

* :func:`read_config` checks ``adapter_config.json`` field by field (a bad field is an :class:`AdapterError`
  naming the file, the field, the value and the fix).
* :func:`read_tensors` reads ``adapter_model.safetensors`` (never pickle), verifies the SHA-256 that
  :func:`weights_blob` records in the safetensors metadata (PEFT ignores it, so PEFT loads the folder unchanged;
  a folder written by PEFT has none and gets the finite check only) and refuses NaN/inf tensors.
* :func:`write_folder` builds the whole folder in a temporary sibling and swaps it in with renames (old folder
  renamed aside, new one renamed in, old removed), so a crash at any point leaves either the old or the new
  folder, never a mix; :func:`resolve_folder` finds the old one again if a crash fell between the two renames.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import shutil
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path

import torch

__all__ = [
    "CONFIG_NAME",
    "HASH_KEY",
    "WEIGHTS_NAME",
    "AdapterError",
    "read_config",
    "read_tensors",
    "resolve_folder",
    "weights_blob",
    "write_folder",
]

CONFIG_NAME = "adapter_config.json"
RUN_ADAPTER = "adapter"  # the subfolder of a ledger run folder that holds its adapter
WEIGHTS_NAME = "adapter_model.safetensors"
HASH_KEY = (
    "runlora_nb.sha256"  # safetensors metadata: SHA-256 of the data section (the bytes after the header)
)
NEW_TAG, OLD_TAG = ".runlora-new-", ".runlora-old-"
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


# ------------------------------------------------------------------------------------------------ config


def _field_error(path: Path, field: str, value, want: str) -> AdapterError:
    return AdapterError(
        f"load_adapter: {path}: field {field!r} is {value!r}; it must be {want}. Fix that field in the file or "
        "re-save the adapter"
    )


def _number(path: Path, cfg: dict, field: str, default: float, low: float, high: float | None) -> float:
    value = cfg.get(field, default)
    if value is None:
        value = default
    ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or value < low or (high is not None and value >= high):
        span = f">= {low}" if high is None else f"in [{low}, {high})"
        raise _field_error(path, field, value, f"a finite number {span}")
    return float(value)


def _names(path: Path, cfg: dict, field: str, allow_str: bool) -> list[str] | str | None:
    value = cfg.get(field)
    if value is None or (allow_str and isinstance(value, str)):
        return value
    if isinstance(value, list | tuple) and all(isinstance(v, str) for v in value):
        return list(value)
    want = "null, a regex string or a list of module names" if allow_str else "null or a list of module names"
    raise _field_error(path, field, value, want)


def read_config(directory: Path) -> dict:
    """Read and check ``adapter_config.json``.

    Args:
        directory: the adapter folder.

    Returns:
        The config with ``r`` (int), ``lora_alpha``, ``lora_dropout`` (floats), ``use_rslora`` (bool),
        ``target_modules`` / ``exclude_modules`` (None, str or list) and ``modules_to_save`` (list) normalised.

    Raises:
        AdapterError: the file is missing, not JSON, not a LoRA config, uses a feature runlora_nb does not run,
            or a field has the wrong type or range.
    """
    path = directory / CONFIG_NAME
    try:
        cfg = json.loads(path.read_text())
    except FileNotFoundError as err:
        raise AdapterError(
            f"load_adapter: {path} is missing; is {directory} a PEFT adapter directory? (a training run's "
            f"adapter is the {RUN_ADAPTER}/ folder inside its run folder, e.g. RUN_DIR/{RUN_ADAPTER})"
        ) from err
    except (OSError, ValueError) as err:
        raise AdapterError(f"load_adapter: {path} is not valid JSON ({err}); re-save the adapter") from err
    if not isinstance(cfg, dict):
        raise AdapterError(
            f"load_adapter: {path} holds a JSON {type(cfg).__name__}, not an object; an adapter config is a "
            'JSON object such as {"peft_type": "LORA", "r": 8, ...}. Re-save the adapter'
        )
    if cfg.get("peft_type", "LORA") != "LORA":
        raise AdapterError(
            f"load_adapter: {path} is not a LoRA adapter config (peft_type={cfg.get('peft_type')!r}); use PEFT"
        )
    used = [label for key, label in UNSUPPORTED.items() if cfg.get(key)]
    if used:
        raise AdapterError(
            f"load_adapter: {path} uses {', '.join(used)}, which runlora_nb does not run; use PEFT"
        )
    if "r" not in cfg:
        raise AdapterError(
            f"load_adapter: {path} has no field 'r' (the LoRA rank); add it (e.g. \"r\": 8) or re-save the adapter"
        )
    r = cfg["r"]
    if isinstance(r, float) and r.is_integer():
        r = int(r)
    if not isinstance(r, int) or isinstance(r, bool) or r < 1:
        raise _field_error(path, "r", cfg["r"], "a positive integer (the LoRA rank)")
    out = dict(cfg)
    out["r"] = r
    out["lora_alpha"] = _number(path, cfg, "lora_alpha", 8.0, 0.0, None)
    out["lora_dropout"] = _number(path, cfg, "lora_dropout", 0.0, 0.0, 1.0)
    rs = cfg.get("use_rslora", False)
    if not isinstance(rs, bool | None):
        raise _field_error(path, "use_rslora", rs, "true or false")
    out["use_rslora"] = bool(rs)
    out["target_modules"] = _names(path, cfg, "target_modules", allow_str=True)
    out["exclude_modules"] = _names(path, cfg, "exclude_modules", allow_str=True)
    out["modules_to_save"] = _names(path, cfg, "modules_to_save", allow_str=False) or []
    task = cfg.get("task_type")
    if task is not None and not isinstance(task, str):
        raise _field_error(path, "task_type", task, 'null or a PEFT task type string such as "CAUSAL_LM"')
    return out


# ------------------------------------------------------------------------------------------------ weights


def _split(raw: bytes) -> tuple[dict, bytes]:
    """(header, data section) of a safetensors file that already parsed."""
    n = int.from_bytes(raw[:8], "little")
    return json.loads(raw[8 : 8 + n]), raw[8 + n :]


def weights_blob(tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> bytes:
    """Serialize ``tensors`` as safetensors with the SHA-256 of the data section in the metadata."""
    from safetensors.torch import save

    meta = {"format": "pt", **(metadata or {})}
    meta.pop(HASH_KEY, None)
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    _, body = _split(save(tensors, metadata=meta))  # the data section does not depend on the metadata
    return save(tensors, metadata={**meta, HASH_KEY: hashlib.sha256(body).hexdigest()})


def read_tensors(directory: Path) -> dict[str, torch.Tensor]:
    """Read ``adapter_model.safetensors``, verify its checksum (when recorded) and that every tensor is finite.

    Args:
        directory: the adapter folder.

    Returns:
        Tensor name → tensor.

    Raises:
        AdapterError: the file is missing (or only a pickle ``.bin`` is there), corrupt, truncated, changed
            since it was saved (checksum), or holds NaN/inf values.
    """
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
        raw = path.read_bytes()
        tensors = load(raw)
        header, body = _split(raw)
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        raise AdapterError(
            f"load_adapter: {path} is corrupt or truncated ({err}); nothing was loaded"
        ) from err
    want = (header.get("__metadata__") or {}).get(HASH_KEY)
    if want is not None and hashlib.sha256(body).hexdigest() != want:
        raise AdapterError(
            f"load_adapter: {path} is corrupt: its SHA-256 differs from the one recorded when it was saved (the "
            "bytes changed on disk); nothing was loaded. Re-save the adapter from the trained model, or re-train"
        )
    for key, t in tensors.items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            bad = int((~torch.isfinite(t)).sum())
            raise AdapterError(
                f"load_adapter: {path}: tensor {key} holds {bad} NaN/inf value(s) of {t.numel()}; the file is "
                "corrupt or the training diverged; nothing was loaded. Re-save the adapter from a finite model, "
                "or re-train (lower the learning rate)"
            )
    return tensors


# ------------------------------------------------------------------------------------------------ folders


def _siblings(directory: Path, tag: str) -> list[Path]:
    parent = directory.parent
    if not parent.is_dir():
        return []
    prefix = f".{directory.name}{tag}"
    return sorted(p for p in parent.iterdir() if p.name.startswith(prefix) and p.is_dir())


def resolve_folder(directory: Path) -> Path:
    """The folder to read: ``directory``, or (after a crash between a save's two renames) the old folder aside."""
    if directory.is_dir():
        return directory
    aside = _siblings(directory, OLD_TAG)
    if not aside:
        return directory
    newest = max(aside, key=lambda p: p.stat().st_mtime)
    warnings.warn(
        f"load_adapter: {directory} is missing but {newest.name} (the previous adapter, set aside by a save that "
        "was interrupted) is complete; loading it. The next save_adapter to this folder puts things back",
        UserWarning,
        stacklevel=3,
    )
    return newest


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def write_file(path: Path, data: bytes) -> None:
    """Write and fsync one file inside a folder being built."""
    with open(path, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    path.chmod(0o644)


def write_folder(directory: str | os.PathLike, fill: Callable[[Path], None], owned: set[str]) -> Path:
    """Build the adapter folder in a temporary sibling with ``fill`` and swap it in with renames.

    Entries of an existing folder that ``fill`` does not own (a tokenizer, a README, checkpoints) are carried
    into the new folder as hard links (copies where links fail). Leftovers of an earlier crashed save are
    cleaned first; if that crash fell between the two renames, the old folder is put back before anything else.

    Args:
        directory: the adapter folder (a symlink is followed).
        fill: writes the new files into the folder it is given.
        owned: file names ``fill`` may write; any of them the new folder lacks is not carried over either.

    Returns:
        The folder.

    Raises:
        AdapterError: ``directory`` exists and is not a folder.
    """
    directory = Path(directory).expanduser()
    if directory.is_symlink():
        directory = directory.resolve()
    if directory.exists() and not directory.is_dir():
        raise AdapterError(f"save_adapter: {directory} is a file, not a folder; pass a folder path")
    directory.parent.mkdir(parents=True, exist_ok=True)
    aside = _siblings(directory, OLD_TAG)
    if (
        aside and not directory.exists()
    ):  # crashed between the renames: the newest aside is the last good folder
        os.rename(max(aside, key=lambda p: p.stat().st_mtime), directory)
    for stale in _siblings(directory, OLD_TAG) + _siblings(directory, NEW_TAG):
        shutil.rmtree(stale, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}{NEW_TAG}", dir=directory.parent))
    try:
        tmp.chmod(directory.stat().st_mode & 0o7777 if directory.exists() else 0o755)
        fill(tmp)
        if directory.exists():
            for entry in directory.iterdir():
                if entry.name in owned or (tmp / entry.name).exists():
                    continue
                if entry.is_dir() and not entry.is_symlink():
                    shutil.copytree(entry, tmp / entry.name, symlinks=True, copy_function=_link_or_copy)
                elif entry.is_symlink():
                    os.symlink(os.readlink(entry), tmp / entry.name)
                else:
                    _link_or_copy(str(entry), str(tmp / entry.name))
        _fsync_dir(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if directory.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{directory.name}{OLD_TAG}", dir=directory.parent))
        os.rmdir(old)  # a unique name for the rename below
        os.rename(directory, old)
        try:
            os.rename(tmp, directory)
        except BaseException:
            os.rename(old, directory)
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        _fsync_dir(directory.parent)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(tmp, directory)
        _fsync_dir(directory.parent)
    return directory
