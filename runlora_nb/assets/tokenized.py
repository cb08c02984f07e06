"""Tokenised training sets: causal-LM blocks, instruction pairs (prompt masked), classification rows, splits, batches.

Every split is deterministic: the same ``seed`` gives the same split and tensors, independent of the global RNG.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase
from .datasets import dataset_kind, load_conversations, load_text

__all__ = [
    "IGNORE_INDEX",
    "TokenDataset",
    "batches",
    "causal_lm_blocks",
    "classification_dataset",
    "instruction_dataset",
    "make_dataset",
]


IGNORE_INDEX = -100


_SPLITS = ("train", "validation")


@dataclass(eq=False)
class TokenDataset(torch.utils.data.Dataset):
    """Equal-length tensors addressed by row; ``dataset[i]`` is a dict of the i-th rows.

    Attributes:
        tensors: ``input_ids`` (n, L) long, ``attention_mask`` (n, L) long, ``labels`` (n, L) long with -100
            on ignored positions — or (n,) class indices for classification.
        label_names: class names for classification (``labels`` index into it); empty otherwise.
        info: provenance: dataset, split, seed, and counts such as ``dropped`` examples.
    """

    tensors: dict[str, torch.Tensor]
    label_names: tuple[str, ...] = ()
    info: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        lengths = {name: len(t) for name, t in self.tensors.items()}
        if not lengths or len(set(lengths.values())) != 1:
            raise ValueError(f"TokenDataset needs tensors with one common first dimension, got {lengths}.")

    def __len__(self) -> int:
        return len(next(iter(self.tensors.values())))

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {name: t[index] for name, t in self.tensors.items()}


# --------------------------------------------------------------------------------------------- splitting


def _check_split(split: str, val_fraction: float) -> None:
    if split not in _SPLITS:
        raise ValueError(f"split must be 'train' or 'validation', got {split!r}.")
    if not 0.0 <= val_fraction < 1.0 or (split == "validation" and val_fraction == 0.0):
        raise ValueError(f"val_fraction must be in (0, 1) (0 allowed for split='train'), got {val_fraction}.")


def _split_indices(n: int, split: str, val_fraction: float, seed: int) -> list[int]:
    """Deterministic split of ``range(n)``; indices come back sorted.

    Args:
        n: number of items (blocks, or groups of examples).
        split: ``"train"`` or ``"validation"``.
        val_fraction: share of items in validation (at least one item when > 0).
        seed: seed of a private ``torch.Generator``; the global RNG is untouched.

    Returns:
        The indices of ``split``.

    Raises:
        ValueError: too few items to give both splits at least one.
    """
    n_val = 0 if val_fraction == 0 else max(1, round(n * val_fraction))
    if n - n_val < 1:
        raise ValueError(
            f"Only {n} item(s): too few for a train/validation split with val_fraction={val_fraction}."
        )
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    chosen = order[:n_val] if split == "validation" else order[n_val:]
    return sorted(chosen)


# --------------------------------------------------------------------------------------------- tokenizing


def _token_ids(tokenizer: PreTrainedTokenizerBase, texts: list[str]) -> list[list[int]]:
    """Token ids of each text, without special tokens added (templates carry their own)."""
    if not texts:
        return []
    return tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"]


def _line_chunks(text: str, size: int = 1 << 14) -> list[str]:
    """Split ``text`` at line ends into pieces of about ``size`` characters (tokenized in one batch)."""
    chunks, current, length = [], [], 0
    for line in text.splitlines(keepends=True):
        current.append(line)
        length += len(line)
        if length >= size:
            chunks.append("".join(current))
            current, length = [], 0
    if current:
        chunks.append("".join(current))
    return chunks


def _pad_id(tokenizer: PreTrainedTokenizerBase) -> int:
    for token_id in (tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.unk_token_id):
        if token_id is not None:
            return int(token_id)
    return 0


def causal_lm_blocks(
    text: str,
    tokenizer: PreTrainedTokenizerBase,
    block_size: int,
    split: str = "train",
    val_fraction: float = 0.1,
    seed: int = 0,
) -> torch.Tensor:
    """Tokenize ``text`` and pack it into contiguous fixed-length blocks, then keep one split of them.

    The tail that does not fill a block is dropped. Blocks are assigned to train/validation by a seeded
    permutation and returned in text order.

    Args:
        text: the corpus.
        tokenizer: any Hugging Face tokenizer (no special tokens are added).
        block_size: tokens per block, >= 2.
        split: ``"train"`` or ``"validation"``.
        val_fraction: share of blocks in validation.
        seed: split seed.

    Returns:
        LongTensor of shape (n_blocks, block_size).

    Raises:
        ValueError: bad arguments, or a text too short for one block per split.
    """
    if block_size < 2:
        raise ValueError(f"block_size must be >= 2, got {block_size}.")
    _check_split(split, val_fraction)
    ids = [i for chunk in _token_ids(tokenizer, _line_chunks(text)) for i in chunk]
    n_blocks = len(ids) // block_size
    if n_blocks < (2 if val_fraction > 0 else 1):
        raise ValueError(
            f"The text has {len(ids)} tokens: too few for block_size={block_size} and a train/validation "
            "split. Use a longer text or a smaller block_size."
        )
    blocks = torch.tensor(ids[: n_blocks * block_size], dtype=torch.long).view(n_blocks, block_size)
    return blocks[_split_indices(n_blocks, split, val_fraction, seed)]


def _grouped_split(keys: list[str], split: str, val_fraction: float, seed: int) -> list[int]:
    """Indices of ``split`` when items sharing a key (e.g. the same prompt) must stay in one split."""
    groups = list(dict.fromkeys(keys))
    chosen = {groups[i] for i in _split_indices(len(groups), split, val_fraction, seed)}
    return [i for i, key in enumerate(keys) if key in chosen]


def _render_pairs(
    tokenizer: PreTrainedTokenizerBase, pairs: list[dict[str, str]]
) -> tuple[list[list[int]], list[list[int]]]:
    """Token ids of the prompt part and of the response part of each pair.

    With a chat template, the prompt part is ``[user]`` rendered with the generation prompt and the response
    part is the rest of ``[user, assistant]`` (including the template's end-of-turn tokens). Without one, or
    if the template breaks that prefix property, plain ``User: …\\nAssistant: `` is used, with bos before
    and eos (or sep) after.

    Returns:
        ``(prompt_ids, response_ids)``, one list per pair.
    """
    prompts, responses = [], []
    template = getattr(tokenizer, "chat_template", None)
    for pair in pairs:
        user = [{"role": "user", "content": pair["prompt"]}]
        if template:
            head = tokenizer.apply_chat_template(user, tokenize=False, add_generation_prompt=True)
            full = tokenizer.apply_chat_template(
                [*user, {"role": "assistant", "content": pair["response"]}], tokenize=False
            )
            if full.startswith(head):
                prompts.append(head)
                responses.append(full[len(head) :])
                continue
        bos = tokenizer.bos_token or ""
        end = tokenizer.eos_token or tokenizer.sep_token or ""
        prompts.append(f"{bos}User: {pair['prompt']}\nAssistant: ")
        responses.append(f"{pair['response']}{end}")
    return _token_ids(tokenizer, prompts), _token_ids(tokenizer, responses)


def instruction_dataset(
    tokenizer: PreTrainedTokenizerBase,
    block_size: int,
    source: str | os.PathLike = "chatterbot",
    split: str = "train",
    val_fraction: float = 0.1,
    seed: int = 0,
) -> TokenDataset:
    """Supervised fine-tuning rows from prompt/response pairs; the loss covers the response only.

    Pairs with the same prompt stay in the same split, so validation prompts are unseen in training. Rows
    are truncated to ``block_size``; a pair whose prompt alone fills the block is dropped
    (``info["dropped"]``).

    Args:
        tokenizer: its chat template is used when it has one (see :func:`_render_pairs`).
        block_size: row length L.
        source: conversation dataset name or ``.jsonl`` path.
        split: ``"train"`` or ``"validation"``.
        val_fraction: share of distinct prompts in validation.
        seed: split seed.

    Returns:
        TokenDataset with ``input_ids``, ``attention_mask``, ``labels`` of shape (n, L); ``labels`` is -100 on
        prompt and padding positions. Padding is on the right.

    Raises:
        ValueError: bad arguments, or no pair fits in ``block_size``.
    """
    if block_size < 2:
        raise ValueError(f"block_size must be >= 2, got {block_size}.")
    _check_split(split, val_fraction)
    pairs = load_conversations(source)
    pairs = [pairs[i] for i in _grouped_split([p["prompt"] for p in pairs], split, val_fraction, seed)]
    prompt_ids, response_ids = _render_pairs(tokenizer, pairs)
    rows, labels = [], []
    for head, tail in zip(prompt_ids, response_ids):
        if len(head) >= block_size or not tail:
            continue
        ids = (head + tail)[:block_size]
        rows.append(ids)
        labels.append([IGNORE_INDEX] * len(head) + ids[len(head) :])
    if not rows:
        raise ValueError(f"No prompt of {source!r} fits in block_size={block_size}; use a larger block_size.")
    tensors = _pad_rows(rows, labels, block_size, _pad_id(tokenizer))
    info = {"source": os.fspath(source), "split": split, "seed": seed, "dropped": len(pairs) - len(rows)}
    return TokenDataset(tensors, info=info)


def _pad_rows(rows: list[list[int]], labels: list[list[int]] | None, length: int, pad_id: int) -> dict:
    """Right-pad rows to ``length``: ``input_ids``, ``attention_mask`` and (if given) ``labels`` (n, length)."""
    n = len(rows)
    input_ids = torch.full((n, length), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((n, length), dtype=torch.long)
    out = {"input_ids": input_ids, "attention_mask": attention_mask}
    if labels is not None:
        out["labels"] = torch.full((n, length), IGNORE_INDEX, dtype=torch.long)
    for i, ids in enumerate(rows):
        input_ids[i, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        attention_mask[i, : len(ids)] = 1
        if labels is not None:
            out["labels"][i, : len(ids)] = torch.tensor(labels[i], dtype=torch.long)
    return out


def classification_dataset(
    tokenizer: PreTrainedTokenizerBase,
    max_length: int,
    source: str | os.PathLike = "chatterbot",
    split: str = "train",
    val_fraction: float = 0.1,
    seed: int = 0,
) -> TokenDataset:
    """Classify a prompt into its conversation category (e.g. ``food``, ``history``).

    Each distinct prompt appears once (its first category wins). Label indices follow the sorted category
    names of the whole dataset, so both splits share them.

    Args:
        tokenizer: special tokens are added as the tokenizer does for single sequences ([CLS]…[SEP], <s>…).
        max_length: row length L (longer prompts are truncated).
        source: conversation dataset name or ``.jsonl`` path with ``category`` fields.
        split: ``"train"`` or ``"validation"``.
        val_fraction: share of prompts in validation.
        seed: split seed.

    Returns:
        TokenDataset with ``input_ids``/``attention_mask`` (n, L), ``labels`` (n,) and ``label_names``.

    Raises:
        ValueError: bad arguments or fewer than two categories.
    """
    if max_length < 2:
        raise ValueError(f"max_length must be >= 2, got {max_length}.")
    _check_split(split, val_fraction)
    first: dict[str, str] = {}
    for pair in load_conversations(source):
        first.setdefault(pair["prompt"], pair["category"])
    label_names = tuple(sorted(set(first.values())))
    if len(label_names) < 2:
        raise ValueError(f"{source!r} has {len(label_names)} category; classification needs at least two.")
    prompts = list(first)
    chosen = [prompts[i] for i in _split_indices(len(prompts), split, val_fraction, seed)]
    encoded = tokenizer(chosen, truncation=True, max_length=max_length, verbose=False)["input_ids"]
    tensors = _pad_rows(encoded, None, max_length, _pad_id(tokenizer))
    tensors["labels"] = torch.tensor([label_names.index(first[p]) for p in chosen], dtype=torch.long)
    info = {"source": os.fspath(source), "split": split, "seed": seed}
    return TokenDataset(tensors, label_names=label_names, info=info)


def make_dataset(
    name: str | os.PathLike,
    tokenizer: PreTrainedTokenizerBase,
    block_size: int = 128,
    split: str = "train",
    seed: int = 0,
    *,
    task: str | None = None,
    val_fraction: float = 0.1,
) -> TokenDataset:
    """One call for a trainer: the right rows for a dataset name or file.

    Args:
        name: dataset name (``sonnets``, ``shakespeare``, ``shakespeare/<work>``, ``chatterbot``,
            ``chatterbot-full``) or a ``.txt`` / ``.jsonl`` path.
        tokenizer: the model's tokenizer.
        block_size: row length L (max_length for classification).
        split: ``"train"`` or ``"validation"``.
        seed: split seed.
        task: ``"causal-lm"`` (text), ``"instruction"`` (conversations, default for them) or
            ``"classification"`` (conversations); None picks the dataset's default.
        val_fraction: share held out for validation.

    Returns:
        TokenDataset with ``input_ids``, ``attention_mask``, ``labels``: (n, L) each for causal-lm (labels =
        input_ids) and instruction; labels (n,) for classification.

    Raises:
        ValueError: unknown name, a task the dataset cannot provide, or bad arguments.
    """
    kind = dataset_kind(name)
    allowed = ("causal-lm",) if kind == "text" else ("instruction", "classification")
    task = task or allowed[0]
    if task not in allowed:
        raise ValueError(
            f"{os.fspath(name)!r} holds {kind}; task must be one of {', '.join(allowed)}, got {task!r}."
        )
    if task == "instruction":
        return instruction_dataset(tokenizer, block_size, name, split, val_fraction, seed)
    if task == "classification":
        return classification_dataset(tokenizer, block_size, name, split, val_fraction, seed)
    blocks = causal_lm_blocks(load_text(name), tokenizer, block_size, split, val_fraction, seed)
    tensors = {"input_ids": blocks, "attention_mask": torch.ones_like(blocks), "labels": blocks.clone()}
    return TokenDataset(tensors, info={"source": os.fspath(name), "split": split, "seed": seed})


def batches(
    dataset: TokenDataset | Mapping[str, torch.Tensor],
    batch_size: int,
    seed: int = 0,
    shuffle: bool = True,
    drop_last: bool = False,
) -> Iterator[dict[str, torch.Tensor]]:
    """Iterate over mini-batches, shuffled by a private generator (pass ``seed + epoch`` for a new order).

    Args:
        dataset: a TokenDataset or a dict of tensors with a common first dimension.
        batch_size: rows per batch, >= 1.
        seed: shuffle seed; the global RNG is untouched.
        shuffle: False keeps the dataset order.
        drop_last: skip a final batch smaller than ``batch_size``.

    Yields:
        Dicts with the dataset's keys; each tensor has ``batch_size`` (or fewer) rows.

    Raises:
        ValueError: ``batch_size`` < 1 or tensors of different lengths.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
    tensors = dict(dataset.tensors if isinstance(dataset, TokenDataset) else dataset)
    n = len(TokenDataset(tensors))  # validates the common length
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)) if shuffle else torch.arange(n)
    for start in range(0, n, batch_size):
        index = order[start : start + batch_size]
        if drop_last and len(index) < batch_size:
            return
        yield {name: t[index] for name, t in tensors.items()}
