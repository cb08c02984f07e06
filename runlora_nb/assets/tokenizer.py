"""A byte-level tokenizer that needs no download, for the tiny random-init models of the zoo.

Every UTF-8 byte is one token, so any text round-trips exactly and no merges or vocab files are needed. Ids
0..3 are the specials ``<pad>``, ``<s>``, ``</s>``, ``<unk>``; ids 4..259 are the bytes 0..255.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerFast

__all__ = ["BYTE_CHAT_TEMPLATE", "BYTE_SPECIAL_TOKENS", "BYTE_VOCAB_SIZE", "byte_tokenizer"]

BYTE_SPECIAL_TOKENS: tuple[str, ...] = ("<pad>", "<s>", "</s>", "<unk>")
BYTE_VOCAB_SIZE = len(BYTE_SPECIAL_TOKENS) + 256

# Plain-text roles; the assistant turn ends with eos so a fine-tuned model learns where to stop. Rendering
# [user] with add_generation_prompt=True is a prefix of rendering [user, assistant]: data.py relies on that.
BYTE_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}System: {{ message['content'] }}\n"
    "{% elif message['role'] == 'user' %}User: {{ message['content'] }}\n"
    "{% else %}Assistant: {{ message['content'] }}{{ eos_token }}\n"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}Assistant: {% endif %}"
)


def _bytes_to_unicode() -> dict[int, str]:
    """Map each byte to a printable character, the convention of byte-level BPE (GPT-2).

    Returns:
        A dict of 256 entries, byte value -> one-character string.
    """
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    mapping = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in mapping:
            mapping[b] = chr(256 + extra)
            extra += 1
    return mapping


def byte_tokenizer(model_max_length: int = 512) -> PreTrainedTokenizerFast:
    """Build the byte-level tokenizer (no files, no network, ~10 ms).

    ``tokenizer("hi")`` gives ``[bos, h, i]`` (a leading ``<s>`` like LLaMA tokenizers); decoding with
    ``skip_special_tokens=True`` returns the text unchanged. The chat template renders plain
    ``User: …`` / ``Assistant: …</s>`` lines.

    Args:
        model_max_length: longest sequence the paired model accepts (its position table size).

    Returns:
        A ``PreTrainedTokenizerFast`` with ``len(tokenizer) == BYTE_VOCAB_SIZE`` (260) and pad/bos/eos/unk set.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {token: i for i, token in enumerate(BYTE_SPECIAL_TOKENS)}
    for byte, char in sorted(_bytes_to_unicode().items()):
        vocab[char] = len(BYTE_SPECIAL_TOKENS) + byte
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    bos, eos = vocab["<s>"], vocab["</s>"]
    backend.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A </s> $B", special_tokens=[("<s>", bos), ("</s>", eos)]
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        model_max_length=model_max_length,
    )
    tokenizer.chat_template = BYTE_CHAT_TEMPLATE
    return tokenizer
