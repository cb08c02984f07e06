"""Export a tuned model: the PEFT adapter folder, a merged transformers folder, a GGUF file + Modelfile, or a
llama.cpp adapter GGUF (:mod:`.gguf_adapter`).

Every export is built in a temporary sibling of ``out``, reloaded from there and compared with the in-memory
tuned model (:func:`~runlora_nb.assess.parity.parity_report`); ``parity.json`` is written next to the artefact
and only then is the folder renamed into place, so a failed export leaves nothing half-written.

A GGUF export to a path ending in ``.gguf`` (``out/x.gguf``) writes that file, with ``x.Modelfile`` and
``x.parity.json`` beside it, instead of a folder: llama.cpp and Ollama are handed the file itself.

Example:
    >>> model, tok = load_model("tiny-llama"); apply_runlora(model, r=4)
    >>> result = export_model(model, tok, "out/merged", "merged")
    >>> result.parity["ok"], result.parity["failed"]
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..common.paths import atomic_dir
from .destination import (
    MANIFEST,
    _check_out,
    _default_modes,
    _export_bytes,
    _no_space,
    _no_space_error,
    _sidecars,
    check_destination,
    check_file_destination,
    gguf_file_layout,
)
from .parity import PARITY_FILE, PARITY_PROMPTS, format_parity, parity_report, write_parity

__all__ = [
    "FORMATS",
    "MANIFEST",
    "ExportResult",
    "base_copy",
    "check_destination",
    "check_file_destination",
    "export_from_files",
    "export_model",
    "gguf_file_layout",
    "merged_copy",
]

FORMATS = ("peft", "merged", "gguf", "gguf-adapter")


@dataclass
class ExportResult:
    """What an export wrote and how closely it matches the tuned model.

    Attributes:
        format: ``peft``, ``merged``, ``gguf`` or ``gguf-adapter``.
        path: the export folder.
        files: names of the files in it.
        parity: the parity report (also in :attr:`parity_file`).
        artefact: for GGUF, the ``.gguf`` file.
        parity_file: where the parity report was written (``path/parity.json``, or ``x.parity.json`` beside
            ``x.gguf``).
    """

    format: str
    path: Path
    files: list[str]
    parity: dict[str, Any] = field(default_factory=dict)
    artefact: Path | None = None
    parity_file: Path | None = None


# ------------------------------------------------------------------------------------------------ model


def _check_tokenizer(tokenizer: Any, fmt: str) -> None:
    if tokenizer is None or not callable(tokenizer) or not hasattr(tokenizer, "save_pretrained"):
        raise ValueError(
            f"export: format {fmt!r} needs the model's tokenizer (got {type(tokenizer).__name__}); pass the "
            "tokenizer load_model returned, or save one next to the model with tokenizer.save_pretrained(folder)"
        )


def _is_peft(model: nn.Module) -> bool:
    return hasattr(model, "peft_config") and hasattr(model, "base_model")


def _inner(model: nn.Module) -> nn.Module:
    return model.base_model.model if _is_peft(model) else model


def _quantized(model: nn.Module) -> bool:
    return any(type(p).__name__ in ("Params4bit", "Int8Params") for p in model.parameters())


def _weight_dtype(model: nn.Module) -> torch.dtype:
    dtypes = [p.dtype for p in model.parameters() if p.is_floating_point()]
    return max(set(dtypes), key=dtypes.count) if dtypes else torch.float32


def _causal(model: nn.Module) -> bool:
    return "CausalLM" in type(_inner(model)).__name__ or "LMHead" in type(_inner(model)).__name__


# ------------------------------------------------------------------------------------------------ copies


def _set_submodule(model: nn.Module, path: str, new: nn.Module) -> None:
    parent, _, name = path.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, name, new)


def base_copy(model: nn.Module) -> nn.Module:
    """A deep copy of the frozen base (adapters removed, not merged): what a PEFT adapter is loaded onto."""
    from ..integrations.inject import runlora_layers

    m = copy.deepcopy(model)
    if _is_peft(m):
        return m.unload()
    for path, layer in list(runlora_layers(m)):
        if hasattr(layer, "base_layer"):
            if getattr(layer, "merged", False):
                raise ValueError(f"export: {path} is merged; unmerge it before exporting the adapter")
            _set_submodule(m, path, layer.base_layer)
    if hasattr(m, "runlora_config"):
        del m.runlora_config
    return m


def merged_copy(model: nn.Module) -> nn.Module:
    """A deep copy with every adapter merged into its base weight (the tuned model stays as it is).

    A quantized base is dequantized, updated and requantized: a warning says the rounding costs accuracy,
    and the parity check measures how much.
    """
    from ..integrations.inject import merge_and_unload

    if _quantized(model):
        warnings.warn(
            "export: merging into a quantized base rounds W + sAB back to the quantization grid; the merged model "
            "differs from the tuned one (see the parity figures). Export the PEFT adapter to keep it exact.",
            UserWarning,
            stacklevel=3,
        )
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*round.*", category=UserWarning)
        return merge_and_unload(copy.deepcopy(model)).eval()


# ------------------------------------------------------------------------------------------------ formats


def _export_peft(model: nn.Module, tokenizer: Any, tmp: Path, prompts) -> dict[str, Any]:
    import peft

    from ..integrations.adapters import save_adapter

    save_adapter(model, tmp)
    reloaded_tok = None
    if tokenizer is not None and hasattr(tokenizer, "save_pretrained"):
        from transformers import AutoTokenizer

        from ..assets.hf import quiet_transformers

        with quiet_transformers():
            tokenizer.save_pretrained(tmp)
            reloaded_tok = AutoTokenizer.from_pretrained(tmp, local_files_only=True, trust_remote_code=False)
    base = base_copy(model)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=UserWarning)
        reloaded = peft.PeftModel.from_pretrained(base, tmp, is_trainable=False)
    return parity_report(
        model,
        reloaded,
        tokenizer,
        dtype=_weight_dtype(model),
        label="peft",
        prompts=prompts,
        candidate_tokenizer=reloaded_tok,
        causal=_causal(model),
    )


def _export_merged(model: nn.Module, tokenizer: Any, tmp: Path, prompts) -> dict[str, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    from ..assets.hf import quiet_transformers

    merged = merged_copy(model)
    dtype = _weight_dtype(merged)
    with quiet_transformers():
        merged.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        if not (tmp / "generation_config.json").exists():
            GenerationConfig.from_model_config(merged.config).save_pretrained(tmp)
        cls = AutoModelForCausalLM if _causal(model) else type(merged)
        reloaded = cls.from_pretrained(tmp, local_files_only=True, trust_remote_code=False, dtype=dtype)
        reloaded_tok = AutoTokenizer.from_pretrained(tmp, local_files_only=True, trust_remote_code=False)
    label = "merged (quantized base)" if _quantized(model) else "merged"
    return parity_report(
        model,
        reloaded,
        tokenizer,
        dtype=torch.float32 if _quantized(model) else dtype,
        label=label,
        prompts=prompts,
        candidate_tokenizer=reloaded_tok,
        causal=_causal(model),
    )


def _export_folder(
    model: nn.Module,
    tokenizer: Any,
    out: Path,
    fmt: str,
    dtype: str,
    prompts,
    pre_tokenizer: str | None,
    base_gguf: str | None = None,
) -> tuple[dict[str, Any], list[str], Path | None]:
    """Build the export folder in a temporary sibling, with ``parity.json`` and the manifest, then move it to
    ``out`` (:func:`~runlora_nb.common.paths.atomic_dir`). Returns the report, the file names, the GGUF."""
    artefact = None
    with atomic_dir(out) as tmp:
        if fmt == "peft":
            report = _export_peft(model, tokenizer, tmp, prompts)
        elif fmt == "merged":
            report = _export_merged(model, tokenizer, tmp, prompts)
        elif fmt == "gguf-adapter":
            from .gguf_adapter import export_gguf_adapter

            report = export_gguf_adapter(
                model,
                tokenizer,
                tmp,
                dtype,
                base_copy(model),
                base_gguf=base_gguf,
                pre_tokenizer=pre_tokenizer,
            )
            artefact = out / report["file"]
        else:
            from .gguf_export import export_gguf

            report = export_gguf(
                model, tokenizer, tmp, dtype, prompts, merged_copy(model), pre_tokenizer=pre_tokenizer
            )
            artefact = out / report["file"]
        write_parity(tmp, report)
        files = sorted([*(p.name for p in tmp.iterdir()), MANIFEST])
        manifest = {"tool": "runlora_nb", "format": fmt, "files": files, "created": time.time()}
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1), encoding="utf-8")
        _default_modes(tmp)
    return report, files, artefact


def _export_gguf_file(
    model: nn.Module, tokenizer: Any, out: Path, dtype: str, prompts, pre_tokenizer: str | None
) -> dict[str, Any]:
    """Write ``out`` (``x.gguf``), ``x.Modelfile`` and ``x.parity.json``: built and checked in a temporary
    sibling folder, then moved into place one by one, the GGUF last (a GGUF there always has its sidecars)."""
    from .gguf_export import export_gguf

    modelfile, parity_file, _ = _sidecars(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        report = export_gguf(
            model,
            tokenizer,
            tmp,
            dtype,
            prompts,
            merged_copy(model),
            gguf_file=out.name,
            modelfile=modelfile.name,
            pre_tokenizer=pre_tokenizer,
        )
        os.replace(write_parity(tmp, report), tmp / parity_file.name)
        _default_modes(tmp)
        for path in _sidecars(out):
            os.replace(tmp / path.name, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return report


def export_model(
    model: nn.Module,
    tokenizer: Any,
    out: str | os.PathLike,
    fmt: str = "merged",
    *,
    dtype: str = "f16",
    prompts: tuple[str, ...] = PARITY_PROMPTS,
    verbose: bool = True,
    force: bool = False,
    pre_tokenizer: str | None = None,
    base_gguf: str | None = None,
) -> ExportResult:
    """Export a tuned model and check the artefact against it.

    Args:
        model: a model with RunLoRA adapters (:func:`~runlora_nb.apply_runlora`), or a PEFT model.
        tokenizer: its tokenizer (required for ``merged`` and ``gguf``; saved with ``peft`` when given).
        out: the export folder (replaced atomically if it is an earlier export; see :func:`check_destination`).
            For ``gguf``, a path ending in ``.gguf`` (not an existing folder) is the GGUF file itself, written
            with ``x.Modelfile`` and ``x.parity.json`` beside it and no manifest (see
            :func:`check_file_destination`).
        fmt: ``peft`` (adapter folder), ``merged`` (transformers folder: safetensors, tokenizer, generation
            config), ``gguf`` (llama models: ``model.gguf`` + ``Modelfile``, or ``x.gguf`` as above) or
            ``gguf-adapter`` (llama models: the LoRA alone as a llama.cpp adapter ``adapter.gguf``, a
            ``Modelfile`` with ``FROM`` + ``ADAPTER``, and ``base.gguf`` unless ``base_gguf`` is given; checked
            structurally by :func:`~.gguf_adapter.check_adapter_gguf`, whose report is ``parity.json``).
        dtype: GGUF tensor type, ``f32``, ``f16`` or ``bf16`` (ignored for the other formats).
        prompts: the parity prompt set.
        verbose: print the parity line.
        force: replace ``out`` even when it is a non-empty folder that is not an earlier export (or, for a
            ``.gguf`` file, when the file or its sidecars exist).
        pre_tokenizer: for ``gguf``, the ``tokenizer.ggml.pre`` name to write instead of the one recognised
            from the tokenizer (see :func:`~.gguf_export.pre_tokenizer_name`).
        base_gguf: for ``gguf-adapter``, the base GGUF the Modelfile's ``FROM`` names (exported by us with
            ``fmt='gguf'`` from the base, or shipped by the model's authors); None writes ``base.gguf``.

    Returns:
        An :class:`ExportResult`; ``parity.json`` and the manifest ``runlora_export.json`` are in the folder
        (for a ``.gguf`` file: ``x.parity.json`` beside it).
        A failed parity check (``result.parity["ok"]`` False, a :class:`~.parity.ParityWarning`) still writes
        the export, so that it can be inspected; the CLI then exits non-zero.

    Raises:
        ValueError: unknown format, missing tokenizer, a non-llama model for GGUF, an unwritable destination,
            a non-empty destination that is not an earlier export (without ``force``), a full disk (the
            message names the folder and the bytes needed); nothing is written and an earlier export stays.
    """
    if fmt not in FORMATS:
        raise ValueError(f"export: format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    if fmt != "peft" and not (fmt == "gguf-adapter" and base_gguf is not None):
        _check_tokenizer(tokenizer, fmt)
    if fmt == "gguf":
        from .gguf_export import check_gguf_exportable, pre_tokenizer_name

        check_gguf_exportable(_inner(model), dtype)
        pre_tokenizer_name(tokenizer, pre_tokenizer)  # an unknown tokenizer fails before any work
    if fmt == "gguf-adapter":
        from .gguf_adapter import adapter_tensors
        from .gguf_export import check_gguf_exportable, pre_tokenizer_name

        check_gguf_exportable(_inner(model), dtype)
        adapter_tensors(model, dtype)  # an adapter llama.cpp cannot hold fails before any work
        if base_gguf is None:
            pre_tokenizer_name(tokenizer, pre_tokenizer)
    file_layout = gguf_file_layout(out, fmt)
    out = _check_out(out, fmt, force)
    had_export = out.exists() if file_layout else out.is_dir() and any(out.iterdir())
    artefact, parity_file = None, out / PARITY_FILE
    try:
        if file_layout:
            report = _export_gguf_file(model, tokenizer, out, dtype, prompts, pre_tokenizer)
            artefact, parity_file = out, _sidecars(out)[1]
            files = [p.name for p in _sidecars(out)]
        else:
            report, files, artefact = _export_folder(
                model, tokenizer, out, fmt, dtype, prompts, pre_tokenizer, base_gguf
            )
    except PermissionError as err:
        raise ValueError(f"export: destination {out} is not writable ({err}); nothing was written") from err
    except Exception as err:  # atomic_dir has removed the partial folder; ``out`` is as it was
        if _no_space(err):
            raise _no_space_error(out, _export_bytes(model, fmt, dtype), had_export) from err
        raise
    if verbose:
        from .gguf_adapter import format_adapter_check

        print(format_adapter_check(report) if fmt == "gguf-adapter" else format_parity(report))
    return ExportResult(fmt, out.parent if file_layout else out, files, report, artefact, parity_file)


def export_from_files(
    model: str | os.PathLike,
    adapter: str | os.PathLike,
    fmt: str,
    out: str | os.PathLike,
    *,
    dtype: str = "f16",
    verbose: bool = True,
    force: bool = False,
    pre_tokenizer: str | None = None,
    base_gguf: str | None = None,
) -> ExportResult:
    """Load ``model`` (zoo name or folder) and its saved ``adapter`` folder, then :func:`export_model`.

    Raises:
        ValueError: unknown model, unreadable adapter, and every error of :func:`export_model`.
    """
    from ..assets.zoo import load_model
    from ..integrations.adapters import load_adapter

    _check_out(out, fmt, force)  # before loading anything
    base, tokenizer = load_model(model)
    tuned = load_adapter(base, adapter)
    return export_model(
        tuned,
        tokenizer,
        out,
        fmt,
        dtype=dtype,
        verbose=verbose,
        force=force,
        pre_tokenizer=pre_tokenizer,
        base_gguf=base_gguf,
    )
