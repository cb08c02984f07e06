"""GGUF export of a tuned llama model: ``model.gguf`` (llama.cpp layout) + an Ollama ``Modelfile``, checked.

The merged model is written with the ``gguf`` package's :class:`gguf.GGUFWriter` the way llama.cpp's
``convert_hf_to_gguf.py`` writes a ``LlamaForCausalLM``: llama hyper-parameters, tensors renamed with
``gguf.get_tensor_name_map`` (q/k projections permuted like ``LlamaModel.permute``, which transformers' GGUF
loader reverses), no ``output.weight`` when the embeddings are tied, norms in f32, and the byte-level BPE
tokenizer (``gpt2`` model: tokens, token types, merges, space prefix, special ids, add-bos/eos, chat template)
in the metadata, with the ``general.*`` keys llama.cpp prints. ``tokenizer.ggml.pre`` (the regex llama.cpp
splits text with before BPE) is recognised from the tokenizer's behaviour as llama.cpp's converter does it
(:func:`pre_tokenizer_name`); a tokenizer it cannot map is refused before anything is written.

The file is then read back twice: with :class:`gguf.GGUFReader` (names, shapes, metadata) and with
transformers (``from_pretrained(folder, gguf_file=...)``, as :mod:`runlora_nb.assets.gguf` loads GGUF), and
the reloaded model is compared with the in-memory tuned model by :func:`~runlora_nb.assess.parity.parity_report`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..common.paths import atomic_write_text
from .gguf_vocab import (
    CHKTXT,
    PRE_TOKENIZERS,
    add_tokenizer,
    bpe_json,
    chktxt_hash,
    empty_array_writer,
    merges_of,
    pre_tokenizer_name,
)
from .parity import parity_report

__all__ = [
    "CHKTXT",
    "GGUF_DTYPES",
    "GGUF_FILE",
    "PRE_TOKENIZERS",
    "SUPPORTED_MODELS",
    "check_gguf_exportable",
    "chktxt_hash",
    "export_gguf",
    "gguf_tensors",
    "modelfile_text",
    "pre_tokenizer_name",
]

GGUF_FILE = "model.gguf"
MODELFILE = "Modelfile"
GGUF_DTYPES = ("f32", "f16", "bf16")
SUPPORTED_MODELS = ("LlamaForCausalLM",)
_TORCH_DTYPES = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}
_CHATML_TEMPLATE = "{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n{{ end }}<|im_start|>assistant\n"


# ------------------------------------------------------------------------------------------------ checks


def _rope_type(config: Any) -> str:
    params = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    return str(params.get("rope_type", params.get("type", "default")) or "default")


def _rope_theta(config: Any) -> float:
    theta = getattr(config, "rope_theta", None)
    if theta is None:
        theta = (getattr(config, "rope_parameters", None) or {}).get("rope_theta", 10000.0)
    return float(theta)


def check_gguf_exportable(model: nn.Module, dtype: str) -> None:
    """Fail before any work unless ``model`` can be written as a llama GGUF in ``dtype``.

    Args:
        model: the plain transformers model (the base under any adapters).
        dtype: the GGUF tensor type, one of :data:`GGUF_DTYPES`.

    Raises:
        ValueError: not a llama-architecture causal LM (e.g. GPT-2, OPT), a llama variant the llama GGUF
            layout cannot describe (rope scaling, biases), a quantized base, or an unknown dtype.
    """
    name = type(model).__name__
    if name not in SUPPORTED_MODELS:
        raise ValueError(
            f"export gguf: model type {name} is not supported; GGUF export writes llama-architecture causal "
            f"LMs ({', '.join(SUPPORTED_MODELS)}: SmolLM2, the zoo's tiny-llama). Export this model with "
            "fmt='merged' (a transformers folder) or fmt='peft' instead"
        )
    if dtype not in GGUF_DTYPES:
        raise ValueError(f"export gguf: dtype must be one of {', '.join(GGUF_DTYPES)}, got {dtype!r}")
    config = model.config
    rope = _rope_type(config)
    if rope != "default":
        raise ValueError(
            f"export gguf: rope type {rope!r} of this {name} is not written by this exporter (only the default "
            "rope); export with fmt='merged' and convert with llama.cpp's convert_hf_to_gguf.py"
        )
    if getattr(config, "attention_bias", False) or getattr(config, "mlp_bias", False):
        raise ValueError(
            f"export gguf: this {name} has attention/MLP biases, which transformers' llama GGUF loader cannot "
            "read back; export with fmt='merged' instead"
        )
    if any(type(p).__name__ in ("Params4bit", "Int8Params") for p in model.parameters()):
        raise ValueError(
            f"export gguf: this {name} has a quantized (bitsandbytes) base; GGUF export needs float weights. "
            "Load the base unquantized, load the adapter onto it and export again, or use fmt='peft'"
        )


# ------------------------------------------------------------------------------------------------ tensors


def _permute(weights: torch.Tensor, n_head: int, n_head_kv: int | None) -> torch.Tensor:
    """llama.cpp's ``LlamaModel.permute``: rotary halves → interleaved pairs, per head."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return (
        weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:])
        .swapaxes(1, 2)
        .reshape(weights.shape)
    )


def _tied(model: nn.Module) -> bool:
    out, inp = model.get_output_embeddings(), model.get_input_embeddings()
    return bool(getattr(model.config, "tie_word_embeddings", False)) or (
        out is not None and out.weight.data_ptr() == inp.weight.data_ptr()
    )


def gguf_tensors(merged: nn.Module, dtype: str) -> dict[str, np.ndarray]:
    """The merged model's tensors as llama.cpp names and lays them out.

    Args:
        merged: a plain ``LlamaForCausalLM`` (adapters merged).
        dtype: :data:`GGUF_DTYPES`; 2-D weights take it, norms (1-D) stay f32. ``bf16`` arrays are uint16 views.

    Returns:
        GGUF name → numpy array (HF shape; the writer records it in ggml's reversed order).

    Raises:
        ValueError: a parameter llama.cpp's name map does not know.
    """
    import gguf

    config = merged.config
    n_head, n_kv = config.num_attention_heads, config.num_key_value_heads
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config.num_hidden_layers)
    tied = _tied(merged)
    out: dict[str, np.ndarray] = {}
    for key, value in merged.state_dict().items():
        if tied and key == "lm_head.weight":
            continue
        name = names.get_name(key, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise ValueError(
                f"export gguf: no llama.cpp name for parameter {key!r}; this llama variant is unsupported"
            )
        tensor = value.detach().float().cpu()
        if key.endswith("self_attn.q_proj.weight"):
            tensor = _permute(tensor, n_head, n_head)
        elif key.endswith("self_attn.k_proj.weight"):
            tensor = _permute(tensor, n_head, n_kv)
        if tensor.ndim == 1 or dtype == "f32":
            array = tensor.numpy().astype(np.float32)
        elif dtype == "f16":
            array = tensor.half().numpy()
        else:
            array = tensor.bfloat16().view(torch.int16).numpy().view(np.uint16)
        out[name] = array  # get_name keeps the matched suffix: "blk.0.attn_q.weight"
    return out


# ------------------------------------------------------------------------------------------------ files


def _basename(config: Any) -> str:
    """The model's short name for ``general.basename``: the last part of the folder or hub id it came from."""
    source = str(getattr(config, "_name_or_path", "") or getattr(config, "name_or_path", "") or "")
    return Path(source.rstrip("/")).name or str(getattr(config, "model_type", "") or "model")


def _add_general(writer: Any, merged: nn.Module, file_type: Any) -> None:
    """The ``general.*`` keys llama.cpp prints when it loads a file (name, basename, size label, file type,
    quantization version), as its converter writes them."""
    import gguf

    seen, count = set(), 0
    for p in merged.parameters():  # tied embeddings counted once, as in the file
        if p.data_ptr() not in seen:
            seen.add(p.data_ptr())
            count += p.numel()
    basename = _basename(merged.config)
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_name(f"{basename} (runlora_nb export)")
    writer.add_basename(basename)
    writer.add_size_label(gguf.size_label(count, 0, 0, 0))
    writer.add_file_type(file_type)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)


def _write_gguf(
    path: Path, merged: nn.Module, tokenizer: Any, dtype: str, pre_tokenizer: str | None = None
) -> dict[str, np.ndarray]:
    import gguf

    config = merged.config
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    file_type = {
        "f32": gguf.LlamaFileType.ALL_F32,
        "f16": gguf.LlamaFileType.MOSTLY_F16,
        "bf16": gguf.LlamaFileType.MOSTLY_BF16,
    }[dtype]
    tensors = gguf_tensors(merged, dtype)
    writer = empty_array_writer(gguf)(path, "llama")
    _add_general(writer, merged, file_type)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_rope_dimension_count(head_dim)
    if head_dim != config.hidden_size // config.num_attention_heads:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    writer.add_rope_freq_base(_rope_theta(config))
    writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))
    writer.add_vocab_size(config.vocab_size)
    add_tokenizer(writer, tokenizer, config.vocab_size, pre_tokenizer)
    finish_gguf(writer, tensors)
    return tensors


def finish_gguf(writer: Any, tensors: dict[str, np.ndarray]) -> None:
    """Add ``tensors`` (bf16 as raw uint16) to a :class:`gguf.GGUFWriter` whose metadata is set, write, close."""
    import gguf

    bf16 = gguf.GGMLQuantizationType.BF16
    for name, array in tensors.items():
        writer.add_tensor(name, array, raw_dtype=bf16 if array.dtype == np.uint16 else None)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def modelfile_text(tokenizer: Any, gguf_file: str = GGUF_FILE) -> str:
    """An Ollama ``Modelfile`` for ``gguf_file``: ChatML templates become a Go ``TEMPLATE``; else a stop on eos.

    Ollama reads the Jinja chat template stored in the GGUF for known templates; only ChatML (SmolLM2) is
    translated here, and every other model gets ``PARAMETER stop`` for its eos token.
    """
    lines = [f"FROM ./{gguf_file}", ""]
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, str) and "<|im_start|>" in template and "<|im_end|>" in template:
        lines += [f'TEMPLATE """{_CHATML_TEMPLATE}"""', 'PARAMETER stop "<|im_end|>"']
    eos = getattr(tokenizer, "eos_token", None)
    if eos and f'PARAMETER stop "{eos}"' not in lines:
        lines.append(f'PARAMETER stop "{eos}"')
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------------------ checks


def _field(reader: Any, key: str) -> Any:
    field = reader.fields.get(key)
    if field is None:
        return None
    return field.contents() if hasattr(field, "contents") else field.parts[field.data[0]]


def _check_file(
    path: Path, tensors: dict[str, np.ndarray], config: Any, pre: str, n_merges: int
) -> dict[str, Any]:
    """Read ``path`` back with :class:`gguf.GGUFReader`; every name, shape and key figure must be as written
    (the pre-tokenizer and the merge count too: transformers' reload ignores both, llama.cpp does not).

    Raises:
        RuntimeError: a tensor is missing, extra or of another shape, or a metadata value differs.
    """
    import gguf

    reader = gguf.GGUFReader(path)
    found = {t.name: tuple(int(n) for n in reversed(list(t.shape))) for t in reader.tensors}
    expected = {name: tuple(a.shape) for name, a in tensors.items()}
    if found != expected:
        diff = sorted(set(found.items()) ^ set(expected.items()))
        raise RuntimeError(f"export gguf: {path.name} tensors differ from what was written: {diff[:6]}")
    meta = {
        "general.architecture": "llama",
        "llama.block_count": config.num_hidden_layers,
        "llama.embedding_length": config.hidden_size,
        "llama.attention.head_count": config.num_attention_heads,
        "llama.attention.head_count_kv": config.num_key_value_heads,
        "tokenizer.ggml.pre": pre,
    }
    for key, want in meta.items():
        got = _field(reader, key)
        if got != want:
            raise RuntimeError(f"export gguf: {path.name} metadata {key} is {got!r}, expected {want!r}")
    n_tokens = len(reader.fields["tokenizer.ggml.tokens"].data)
    if n_tokens != config.vocab_size:
        raise RuntimeError(
            f"export gguf: {path.name} has {n_tokens} tokens, the model's vocab is {config.vocab_size}"
        )
    merges = reader.fields.get("tokenizer.ggml.merges")
    found_merges = -1 if merges is None else len(merges.data)
    if found_merges != n_merges:
        raise RuntimeError(
            f"export gguf: {path.name} has {found_merges} merges (-1: no merges key), the tokenizer {n_merges}"
        )
    return {"tensors": len(found), "tokens": n_tokens, "merges": n_merges, "bytes": path.stat().st_size}


def _coarser(dtype: torch.dtype, model: nn.Module) -> torch.dtype:
    """The less precise of the GGUF dtype and the model's own weights: a bf16 model exported as f32 still
    computes its reference logits in bf16, so the parity tolerance must be bf16's."""
    floats = [p.dtype for p in model.parameters() if p.is_floating_point()]
    weights = max(set(floats), key=floats.count) if floats else dtype
    return max(dtype, weights, key=lambda d: torch.finfo(d).eps)


def export_gguf(
    model: nn.Module,
    tokenizer: Any,
    tmp_dir: Path,
    dtype: str,
    prompts: tuple[str, ...],
    merged: nn.Module,
    *,
    gguf_file: str = GGUF_FILE,
    modelfile: str = MODELFILE,
    pre_tokenizer: str | None = None,
) -> dict[str, Any]:
    """Write ``gguf_file`` + ``modelfile`` into ``tmp_dir``, read both back and measure parity.

    Args:
        model: the in-memory tuned model (the parity reference).
        tokenizer: its fast byte-level BPE tokenizer.
        tmp_dir: the (temporary) export folder.
        dtype: ``f32``, ``f16`` or ``bf16``.
        prompts: the parity prompt set.
        merged: a plain transformers copy of ``model`` with the adapters merged (what is written).
        gguf_file: the GGUF file's name (``model.gguf`` in a folder export, ``x.gguf`` for ``--out x.gguf``).
        modelfile: the Ollama Modelfile's name (its ``FROM`` names ``gguf_file``).
        pre_tokenizer: ``tokenizer.ggml.pre`` to write instead of the one :func:`pre_tokenizer_name` picks.

    Returns:
        The parity report plus ``file`` (``gguf_file``), ``gguf_dtype``, ``pre_tokenizer`` and ``gguf``
        (tensor/token counts).

    Raises:
        ValueError: see :func:`check_gguf_exportable`, a tokenizer GGUF cannot describe, or one whose llama.cpp
            pre-tokenizer is unknown (see :func:`pre_tokenizer_name`).
        RuntimeError: the file read back differs from what was written.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ..assets.hf import quiet_transformers

    check_gguf_exportable(merged, dtype)
    bpe_json(tokenizer)  # before writing anything
    pre = pre_tokenizer_name(tokenizer, pre_tokenizer)
    tmp_dir = Path(tmp_dir)
    path = tmp_dir / gguf_file
    tensors = _write_gguf(path, merged, tokenizer, dtype, pre)
    summary = _check_file(path, tensors, merged.config, pre, len(merges_of(bpe_json(tokenizer))))
    atomic_write_text(tmp_dir / modelfile, modelfile_text(tokenizer, gguf_file))
    with quiet_transformers():
        reloaded = AutoModelForCausalLM.from_pretrained(
            tmp_dir, gguf_file=gguf_file, local_files_only=True, dtype=torch.float32
        )
        reloaded_tok = AutoTokenizer.from_pretrained(tmp_dir, gguf_file=gguf_file, local_files_only=True)
    report = parity_report(
        model,
        reloaded,
        tokenizer,
        dtype=_coarser(_TORCH_DTYPES[dtype], merged),
        label=f"gguf {dtype}",
        prompts=prompts,
        candidate_tokenizer=reloaded_tok,
        causal=True,
    )
    return {**report, "file": gguf_file, "gguf_dtype": dtype, "pre_tokenizer": pre, "gguf": summary}
