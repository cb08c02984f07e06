"""The tokenizer half of a GGUF file: tokens, token types, merges, special ids, the chat template and the
pre-tokenizer name llama.cpp splits text with.

``tokenizer.ggml.pre`` is recognised from the tokenizer's behaviour, the way llama.cpp's
``convert_hf_to_gguf.py`` does it (:func:`pre_tokenizer_name`: a hash of the ids it gives for a fixed text); a
tokenizer it cannot map is refused before anything is written, since llama.cpp would split text differently
from transformers and answer the tested prompts differently.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

__all__ = ["CHKTXT", "PRE_TOKENIZERS", "add_tokenizer", "bpe_json", "chktxt_hash", "empty_array_writer",
           "merges_of", "pre_tokenizer_name"]  # fmt: skip

# llama.cpp's token types (gguf.TokenType): NORMAL, CONTROL, USER_DEFINED, UNUSED.
_NORMAL, _CONTROL, _USER_DEFINED, _UNUSED = 1, 3, 4, 5


def bpe_json(tokenizer: Any) -> dict[str, Any]:
    """The fast tokenizer's JSON, checked to be a byte-level BPE (what GGUF's ``gpt2`` model describes)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise ValueError(
            f"export gguf: the tokenizer ({type(tokenizer).__name__}) is not a fast tokenizer; load it with "
            "AutoTokenizer.from_pretrained(..., use_fast=True)"
        )
    spec = json.loads(backend.to_str())
    kind = spec.get("model", {}).get("type")
    text = json.dumps([spec.get("pre_tokenizer"), spec.get("decoder")])
    if kind != "BPE" or "ByteLevel" not in text:
        raise ValueError(
            f"export gguf: the tokenizer is a {kind} model without byte-level pre-tokenization; only byte-level "
            "BPE tokenizers (GPT-2/SmolLM2 style, the zoo's byte tokenizer) are written. Use fmt='merged'"
        )
    return spec


def _vocab(tokenizer: Any, vocab_size: int) -> tuple[list[str], list[int]]:
    """Tokens by id, padded to ``vocab_size`` with llama.cpp's ``[PAD{i}]`` (UNUSED), and their types."""
    by_id = {i: t for t, i in tokenizer.get_vocab().items()}
    if by_id and max(by_id) >= vocab_size:
        raise ValueError(
            f"export gguf: the tokenizer has id {max(by_id)} but the model's vocab_size is {vocab_size}; "
            "resize the embeddings (model.resize_token_embeddings(len(tokenizer))) before exporting"
        )
    special = set(tokenizer.all_special_ids)
    added = {i: t for i, t in getattr(tokenizer, "added_tokens_decoder", {}).items()}
    tokens, types = [], []
    for i in range(vocab_size):
        if i not in by_id:
            tokens.append(f"[PAD{i}]")
            types.append(_UNUSED)
        else:
            tokens.append(by_id[i])
            tok = added.get(i)
            if i in special or (tok is not None and getattr(tok, "special", False)):
                types.append(_CONTROL)
            elif tok is not None:
                types.append(_USER_DEFINED)
            else:
                types.append(_NORMAL)
    return tokens, types


def merges_of(spec: dict[str, Any]) -> list[str]:
    merges = spec.get("model", {}).get("merges") or []
    return [m if isinstance(m, str) else " ".join(m) for m in merges]


def empty_array_writer(gguf: Any) -> type:
    """``gguf.GGUFWriter`` that can store an empty array.

    llama.cpp refuses a ``gpt2`` vocabulary without the ``tokenizer.ggml.merges`` key ("cannot find tokenizer
    merges"), and a byte tokenizer has no merges; the format allows an empty array (item type + count 0),
    only the writer refuses one.
    """

    class Writer(gguf.GGUFWriter):
        def _pack_val(self, val: Any, vtype: Any, add_vtype: bool, sub_type: Any = None) -> bytes:
            if vtype == gguf.GGUFValueType.ARRAY and len(val) == 0:
                head = self._pack("I", vtype) if add_vtype else b""
                return head + self._pack("I", sub_type or gguf.GGUFValueType.STRING) + self._pack("Q", 0)
            return super()._pack_val(val, vtype, add_vtype, sub_type)

    return Writer


def add_tokenizer(writer: Any, tokenizer: Any, vocab_size: int, pre_tokenizer: str | None = None) -> None:
    """The ``tokenizer.*`` keys llama.cpp's converter writes for a byte-level BPE (``_set_vocab_gpt2`` and
    ``gguf.SpecialVocab``): model, pre-tokenizer, tokens and types, merges, space prefix, special ids, the
    add-bos/eos flags and the chat template."""
    import gguf

    spec = bpe_json(tokenizer)
    tokens, types = _vocab(tokenizer, vocab_size)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre_tokenizer_name(tokenizer, pre_tokenizer))
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    # always present, even empty: llama.cpp will not load a gpt2 vocabulary without the key
    writer.add_key_value(
        gguf.Keys.Tokenizer.MERGES,
        merges_of(spec),
        gguf.GGUFValueType.ARRAY,
        sub_type=gguf.GGUFValueType.STRING,
    )
    writer.add_add_space_prefix(_space_prefix(spec))
    for kind, add in (
        ("bos", writer.add_bos_token_id),
        ("eos", writer.add_eos_token_id),
        ("unk", writer.add_unk_token_id),
        ("pad", writer.add_pad_token_id),
    ):
        token_id = getattr(tokenizer, f"{kind}_token_id", None)
        if token_id is not None:
            add(int(token_id))
    ids = tokenizer("a")["input_ids"]
    if tokenizer.bos_token_id is not None:
        writer.add_add_bos_token(bool(ids) and ids[0] == tokenizer.bos_token_id)
    if tokenizer.eos_token_id is not None:
        writer.add_add_eos_token(bool(ids) and ids[-1] == tokenizer.eos_token_id and len(ids) > 1)
    if isinstance(getattr(tokenizer, "chat_template", None), str):
        writer.add_chat_template(tokenizer.chat_template)


# ------------------------------------------------------------------------------------------------ pre-tokenizer

# llama.cpp picks its pre-tokenizer (the regex that splits text before BPE) from ``tokenizer.ggml.pre``, and
# its converter chooses that name from the tokenizer's behaviour, not its config: it encodes this text and
# hashes the ids. Text and hashes are copied from ``get_vocab_base_pre`` in llama.cpp's
# ``convert_hf_to_gguf.py`` (github.com/ggml-org/llama.cpp, MIT), so a file we write says what theirs would.
CHKTXT = (
    "\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n🚀 (normal) 😶\u200d🌫️ (multiple emojis concatenated) ✅ 🦙🦙 "
    "3 33 333 3333 33333 333333 3333333 33333333 3.3 3..3 3...3 កាន់តែពិសេសអាច😁 ?我想在apple工作1314151天～ "
    "------======= нещо на Български ''''''```````\"\"\"\"......!!!!!!?????? I've been 'told he's there, 'RE you "
    "sure? 'M not sure I'll make it, 'D you like some tea? We'Ve a'lL"
)
PRE_TOKENIZERS = {  # sha256(str(tokenizer.encode(CHKTXT))) -> tokenizer.ggml.pre (convert_hf_to_gguf.py)
    "855059429035d75a914d1eda9f10a876752e281a054a7a3d421ef0533e5b6249": "smollm",  # HuggingFaceTB/SmolLM-135M
    "3ce83efda5659b07b1ad37ca97ca5797ea4285d9b9ab0dc679e4a720c9da7454": "gpt-2",  # openai-community/gpt2
    "0ef9807a4087ebef797fc749390439009c3b9eda9ad1a097abbe738f486c01e5": "llama-bpe",  # meta-llama/Meta-Llama-3-8B
    "e636dc30a262dcc0d8c323492e32ae2b70728f4df7dfe9737d9f920a282b8aea": "qwen2",  # Qwen/Qwen1.5-7B
}


def chktxt_hash(tokenizer: Any) -> str:
    """The sha256 llama.cpp's converter uses to recognise a BPE pre-tokenizer: of ``str`` of the ids of
    :data:`CHKTXT` (special tokens added, as ``tokenizer.encode`` does by default)."""
    return hashlib.sha256(str(tokenizer.encode(CHKTXT)).encode()).hexdigest()


def pre_tokenizer_name(tokenizer: Any, override: str | None = None) -> str:
    """The ``tokenizer.ggml.pre`` value for ``tokenizer``, chosen as llama.cpp's converter chooses it.

    A byte-level BPE without merges encodes every text byte by byte whatever the split, so any llama.cpp
    pre-tokenizer gives its ids; ``default`` is written for it (the zoo's byte tokenizer).

    Args:
        tokenizer: a fast byte-level BPE tokenizer.
        override: a llama.cpp pre-tokenizer name to write instead (for a tokenizer the table does not know,
            after checking which one llama.cpp uses for that model family).

    Returns:
        The name, e.g. ``smollm`` for SmolLM/SmolLM2.

    Raises:
        ValueError: ``override`` is not a non-empty string, or the tokenizer's hash is not in
            :data:`PRE_TOKENIZERS` and it has merges (the message gives the hash and the fix).
    """
    if override is not None:
        if not isinstance(override, str) or not override.strip():
            raise ValueError(
                f"export gguf: pre_tokenizer must be a llama.cpp pre-tokenizer name such as 'smollm' or "
                f"'llama-bpe', got {override!r}"
            )
        return override.strip()
    digest = chktxt_hash(tokenizer)
    if digest in PRE_TOKENIZERS:
        return PRE_TOKENIZERS[digest]
    if not merges_of(bpe_json(tokenizer)):
        return "default"
    name = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
    raise ValueError(
        f"export gguf: llama.cpp's pre-tokenizer for the tokenizer {name!r} is unknown (chktxt sha256 {digest}, "
        f"known: {', '.join(sorted(set(PRE_TOKENIZERS.values())))}); with a wrong one llama.cpp splits text "
        "differently and answers differently. Look the hash up in get_vocab_base_pre of llama.cpp's "
        "convert_hf_to_gguf.py and pass its name as pre_tokenizer=..., or export with fmt='merged'"
    )


def _space_prefix(spec: dict[str, Any]) -> bool:
    """Whether the tokenizer adds a space before the text (a ``ByteLevel`` or ``Metaspace`` with
    ``add_prefix_space``/``prepend_scheme``), which llama.cpp reads as ``tokenizer.ggml.add_space_prefix``."""
    found: list[bool] = []

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            if node.get("type") in ("ByteLevel", "Metaspace"):
                found.append(
                    bool(node.get("add_prefix_space")) or node.get("prepend_scheme") in ("always", "first")
                )
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk([spec.get("normalizer"), spec.get("pre_tokenizer")])
    return any(found)
