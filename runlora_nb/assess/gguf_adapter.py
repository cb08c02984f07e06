"""Adapter GGUF of a tuned llama model: ``adapter.gguf`` (llama.cpp ``--lora``) + an Ollama ``Modelfile``.

The LoRA alone is written the way llama.cpp's ``convert_lora_to_gguf.py`` writes a PEFT adapter:
``general.type = "adapter"``, ``general.architecture = "llama"``, ``adapter.type = "lora"``,
``adapter.lora.alpha`` (f32), and for every adapted linear layer two tensors named after the base GGUF's
tensor (``gguf.get_tensor_name_map``, exactly as :mod:`.gguf_export` names the base) with the suffixes
``.lora_a`` (torch shape r × in, ggml ``ne = [in, r]``) and ``.lora_b`` (out × r, ``ne = [r, out]``).
llama.cpp's loader (``src/llama-adapter.cpp``) checks ``ne`` against the base tensor's and that
``a.ne[1] == b.ne[0]``; ``llm_build_lora_mm`` adds ``scale · b·(a·x)`` with
``scale = adapter_scale · alpha / b.ne[0]`` (``llama_adapter_lora_weight::get_scale``).

The file is read back with :class:`gguf.GGUFReader` and :func:`check_adapter_gguf` rebuilds
``scale · B·A`` for every module from the file and compares it with the tuned model's delta, permuted as the
base export permutes that weight. Not yet run here: llama.cpp's own acceptance (base GGUF + this adapter
gives the same greedy tokens as the merged GGUF), which needs a llama.cpp build.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..common.numerics import rounding_bound
from ..common.paths import atomic_write_text
from .gguf_export import (
    _basename,
    _permute,
    _tied,
    _write_gguf,
    check_gguf_exportable,
    finish_gguf,
    pre_tokenizer_name,
)

__all__ = [
    "ADAPTER_DTYPES",
    "ADAPTER_FILE",
    "BASE_FILE",
    "adapter_deltas",
    "adapter_modelfile_text",
    "adapter_tensors",
    "check_adapter_gguf",
    "export_gguf_adapter",
    "lora_modules",
]

ADAPTER_FILE = "adapter.gguf"
BASE_FILE = "base.gguf"
MODELFILE = "Modelfile"
ADAPTER_DTYPES = ("f32", "f16")


# ------------------------------------------------------------------------------------------------ modules


def _inner(model: nn.Module) -> nn.Module:
    return model.base_model.model if hasattr(model, "peft_config") and hasattr(model, "base_model") else model


def _one_module(path: str, mod: nn.Module) -> tuple[torch.Tensor, torch.Tensor, float]:
    """(A r×in, B out×r, scale) of one LoRA layer: a RunLoRALinear, or a PEFT layer with one active adapter."""
    lora_a, lora_b, scaling = mod.lora_A, mod.lora_B, mod.scaling
    if isinstance(lora_a, nn.ModuleDict):
        active = [a for a in getattr(mod, "active_adapters", ()) if a in lora_a]
        if len(active) != 1:
            raise ValueError(
                f"export gguf-adapter: {path} has active adapters {active}; a llama.cpp adapter holds one LoRA. "
                "Activate exactly one (model.set_adapter(name)) and export again"
            )
        name = active[0]
        if getattr(mod, "use_dora", {}).get(name, False):
            raise ValueError(
                f"export gguf-adapter: {path} is a DoRA layer, which llama.cpp adapters cannot express; "
                "export with fmt='gguf' (merged) instead"
            )
        lora_a, lora_b, scaling = lora_a[name], lora_b[name], scaling[name]
    if getattr(lora_b, "bias", None) is not None or getattr(mod, "fan_in_fan_out", False):
        raise ValueError(
            f"export gguf-adapter: {path} has a LoRA bias or a fan-in-fan-out (Conv1D) base, which a llama.cpp "
            "adapter cannot express; export with fmt='gguf' (merged) instead"
        )
    return lora_a.weight.detach().float().cpu(), lora_b.weight.detach().float().cpu(), float(scaling)


def lora_modules(model: nn.Module) -> dict[str, tuple[torch.Tensor, torch.Tensor, float]]:
    """Module path (``model.layers.0.self_attn.q_proj``) → (A, B, scale) for every LoRA layer of ``model``.

    Raises:
        ValueError: no LoRA layer, a layer with several active adapters, DoRA, a LoRA bias, embedding LoRA.
    """
    out = {}
    for path, mod in _inner(model).named_modules():
        if hasattr(mod, "lora_embedding_A") and len(getattr(mod, "lora_embedding_A", ())) > 0:
            raise ValueError(
                f"export gguf-adapter: {path} has an embedding LoRA, which this exporter does not write; "
                "export with fmt='gguf' (merged) instead"
            )
        if hasattr(mod, "lora_A") and hasattr(mod, "lora_B") and hasattr(mod, "scaling"):
            if isinstance(mod.lora_A, nn.ModuleDict) and len(mod.lora_A) == 0:
                continue
            out[path] = _one_module(path, mod)
    if not out:
        raise ValueError(
            f"export gguf-adapter: {type(model).__name__} has no LoRA layers; pass the tuned model "
            "(apply_runlora or a PEFT model), not its base"
        )
    return out


def _gguf_name(names: Any, path: str) -> str:
    name = names.get_name(path + ".weight", try_suffixes=(".weight",))
    if name is None:
        raise ValueError(
            f"export gguf-adapter: no llama.cpp name for LoRA target {path!r}; only the base GGUF's "
            "linear layers (attention, MLP, output) can carry a llama.cpp adapter"
        )
    return name


def _permuted(path: str, b: torch.Tensor, config: Any) -> torch.Tensor:
    """``B`` with the rows of the base weight's GGUF permutation.

    The base export writes ``P·W`` for q/k (rotary halves → interleaved pairs; ``P`` permutes rows). The
    merged weight is ``P·(W + s·B·A) = P·W + s·(P·B)·A``: permuting the rows of ``W`` is permuting the rows
    of ``B``, and ``A`` is unchanged. llama.cpp's converter does the same (its ``LoraTorchTensor.permute``
    touches ``B`` only).
    """
    n_head, n_kv = config.num_attention_heads, config.num_key_value_heads
    if path.endswith("self_attn.q_proj"):
        return _permute(b, n_head, n_head)
    if path.endswith("self_attn.k_proj"):
        return _permute(b, n_head, n_kv)
    return b


def adapter_deltas(model: nn.Module) -> dict[str, torch.Tensor]:
    """Base GGUF name (``blk.0.attn_q.weight``) → the tuned model's ``s·B·A`` (fp32), permuted as the base export
    permutes that weight: what the adapter must add to the base GGUF's tensor."""
    import gguf

    config = _inner(model).config
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config.num_hidden_layers)
    return {
        _gguf_name(names, path): s * (_permuted(path, b, config) @ a)
        for path, (a, b, s) in lora_modules(model).items()
    }


def adapter_tensors(model: nn.Module, dtype: str) -> tuple[dict[str, np.ndarray], float]:
    """The ``.lora_a`` / ``.lora_b`` arrays (torch shapes; the writer reverses them into ggml's ``ne``) and
    ``adapter.lora.alpha``.

    llama.cpp scales each pair by ``alpha / r`` with one ``alpha`` per file and ``r`` read from the tensor,
    so ``alpha = s·r`` of the first module makes its scale our ``s`` (also for rsLoRA, ``s = alpha/√r``).
    A module whose ``s·r`` differs (PEFT's ``rank_pattern`` / ``alpha_pattern``) gets the ratio folded into
    its ``B``, so that every module's product is still exactly ``s·B·A``.

    Raises:
        ValueError: see :func:`lora_modules`; an adapter on a tied ``lm_head`` (the base GGUF has no
            ``output.weight`` then); a dtype other than :data:`ADAPTER_DTYPES`.
    """
    import gguf

    if dtype not in ADAPTER_DTYPES:
        raise ValueError(
            f"export gguf-adapter: dtype must be one of {', '.join(ADAPTER_DTYPES)}, got {dtype!r}"
        )
    inner = _inner(model)
    config = inner.config
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config.num_hidden_layers)
    modules = lora_modules(model)
    if "lm_head" in modules and _tied(inner):
        raise ValueError(
            "export gguf-adapter: the LoRA adapts lm_head, whose weight is tied to the embeddings; the base GGUF "
            "has no output.weight for it. Train without lm_head in target_modules, or export fmt='gguf'"
        )
    first = next(iter(modules.values()))
    alpha = first[2] * first[0].shape[0]
    np_dtype = np.float32 if dtype == "f32" else np.float16
    out: dict[str, np.ndarray] = {}
    for path, (a, b, s) in modules.items():
        name = _gguf_name(names, path)
        b = _permuted(path, b, config) * (s * a.shape[0] / alpha)
        out[name + ".lora_a"] = a.numpy().astype(np_dtype)
        out[name + ".lora_b"] = b.numpy().astype(np_dtype)
    return out, float(alpha)


# ------------------------------------------------------------------------------------------------ files


def write_adapter_gguf(path: Path, model: nn.Module, dtype: str) -> dict[str, np.ndarray]:
    """Write the adapter GGUF at ``path`` with the keys llama.cpp's converter writes; returns its tensors."""
    import gguf

    tensors, alpha = adapter_tensors(model, dtype)
    inner = _inner(model)
    writer = gguf.GGUFWriter(path, "llama")
    writer.add_type(gguf.GGUFType.ADAPTER)
    writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
    writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, alpha)
    basename = _basename(inner.config)
    writer.add_name(f"{basename} LoRA (runlora_nb export)")
    writer.add_basename(basename)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32 if dtype == "f32" else gguf.LlamaFileType.MOSTLY_F16)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    finish_gguf(writer, tensors)
    return tensors


def adapter_modelfile_text(base_gguf: str, adapter_file: str = ADAPTER_FILE) -> str:
    """An Ollama ``Modelfile``: ``FROM`` the base GGUF, ``ADAPTER`` the LoRA (paths relative to the Modelfile,
    or absolute)."""
    return f"FROM {base_gguf}\nADAPTER ./{adapter_file}\n"


def _field(reader: Any, key: str) -> Any:
    field = reader.fields.get(key)
    return None if field is None else field.contents()


def check_adapter_gguf(path: str | Path, model: nn.Module, dtype: str) -> dict[str, Any]:
    """Read the adapter GGUF back and check it against ``model``, module by module.

    For every pair the delta llama.cpp adds is rebuilt from the file: ``lora_a`` (``ne = [in, r]``, read as
    torch r × in) and ``lora_b`` (out × r) give ``llm_build_lora_mm``'s ``b·(a·x)``, i.e. ``B·A``, times
    ``alpha / r`` with ``r = b.ne[0]``. It must equal :func:`adapter_deltas` (our ``s·B·A``, permuted like the
    base weight) within the storage dtype's rounding bound (fp32 is near exact).

    Returns:
        ``ok``, ``failed`` (GGUF names that differ), ``max_rel_diff``, ``bound``, ``alpha``, ``modules``.

    Raises:
        RuntimeError: missing/extra tensors, a wrong shape, or metadata llama.cpp would refuse.
    """
    import gguf

    reader = gguf.GGUFReader(path)
    meta = {"general.type": "adapter", "general.architecture": "llama", "adapter.type": "lora"}
    for key, want in meta.items():
        if _field(reader, key) != want:
            raise RuntimeError(
                f"export gguf-adapter: {path} {key} is {_field(reader, key)!r}, expected {want!r}"
            )
    alpha = float(_field(reader, "adapter.lora.alpha") or 0.0)
    tensors = {t.name: torch.from_numpy(np.array(t.data, dtype=np.float32)) for t in reader.tensors}
    expected = adapter_deltas(model)
    names = {f"{n}.{s}" for n in expected for s in ("lora_a", "lora_b")}
    if set(tensors) != names:
        raise RuntimeError(
            f"export gguf-adapter: {path} tensors differ: {sorted(set(tensors) ^ names)[:6]} (missing or extra)"
        )
    eps_dtype = torch.float32 if dtype == "f32" else torch.float16
    worst, failed, bound = 0.0, [], 0.0
    for name, delta in expected.items():
        a, b = tensors[name + ".lora_a"], tensors[name + ".lora_b"]
        if a.ndim != 2 or b.ndim != 2 or a.shape[1] != delta.shape[1] or b.shape[0] != delta.shape[0]:
            raise RuntimeError(
                f"export gguf-adapter: {name} has lora shapes {tuple(a.shape)}, {tuple(b.shape)}"
            )
        if a.shape[0] != b.shape[1]:
            raise RuntimeError(f"export gguf-adapter: {name}.lora_a is not transposed against lora_b")
        rebuilt = (alpha if alpha else b.shape[1]) / b.shape[1] * (b.double() @ a.double())
        # both factors rounded once each, then an r-term dot product: the bound of that product
        tol = rounding_bound(eps_dtype, a.shape[0], depth=2)
        rel = float((rebuilt - delta.double()).norm() / max(float(delta.double().norm()), 1e-30))
        worst, bound = max(worst, rel), max(bound, tol)
        if rel > tol:
            failed.append(name)
    return {
        "ok": not failed,
        "failed": failed,
        "max_rel_diff": worst,
        "bound": bound,
        "alpha": alpha,
        "modules": len(expected),
    }


def format_adapter_check(report: dict[str, Any]) -> str:
    """One printable line for :func:`check_adapter_gguf`'s report."""
    status = "OK" if report["ok"] else "FAILED (" + ", ".join(report["failed"][:4]) + ")"
    return (
        f"adapter check {report.get('export', 'gguf-adapter')}: {status}; {report['modules']} modules, "
        f"max_rel_diff={report['max_rel_diff']:.3g} (bound {report['bound']:.3g}), alpha={report['alpha']:g}"
    )


def export_gguf_adapter(
    model: nn.Module,
    tokenizer: Any,
    tmp_dir: Path,
    dtype: str,
    base: nn.Module,
    *,
    base_gguf: str | None = None,
    pre_tokenizer: str | None = None,
) -> dict[str, Any]:
    """Write ``adapter.gguf`` + ``Modelfile`` (and ``base.gguf`` when no ``base_gguf``) into ``tmp_dir``, checked.

    Args:
        model: the tuned model (RunLoRA or PEFT).
        tokenizer: its tokenizer (written into ``base.gguf``).
        tmp_dir: the (temporary) export folder.
        dtype: ``f32`` or ``f16``, for the adapter and the base written here.
        base: the plain base model (adapters removed, not merged), written as ``base.gguf``.
        base_gguf: the base GGUF the Modelfile's ``FROM`` names (one exported by us, or the model authors');
            None writes ``base.gguf`` beside the adapter and names that.
        pre_tokenizer: ``tokenizer.ggml.pre`` for ``base.gguf`` (see :func:`.gguf_export.pre_tokenizer_name`).

    Returns:
        :func:`check_adapter_gguf`'s report plus ``export``, ``file``, ``gguf_dtype`` and ``base_gguf``.

    Raises:
        ValueError: a non-llama base, an unsupported adapter (see :func:`lora_modules`), an unknown dtype.
        RuntimeError: the file read back is not what llama.cpp expects.
    """
    check_gguf_exportable(base, dtype)
    adapter_tensors(model, dtype)  # every refusal before anything is written
    tmp_dir = Path(tmp_dir)
    if base_gguf is None:
        pre = pre_tokenizer_name(tokenizer, pre_tokenizer)
        _write_gguf(tmp_dir / BASE_FILE, base, tokenizer, dtype, pre)
        base_gguf = f"./{BASE_FILE}"
    write_adapter_gguf(tmp_dir / ADAPTER_FILE, model, dtype)
    report = check_adapter_gguf(tmp_dir / ADAPTER_FILE, model, dtype)
    atomic_write_text(tmp_dir / MODELFILE, adapter_modelfile_text(base_gguf))
    return {
        **report,
        "export": "gguf-adapter",
        "file": ADAPTER_FILE,
        "gguf_dtype": dtype,
        "base_gguf": base_gguf,
    }
