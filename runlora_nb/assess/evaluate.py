"""Is the tuned model better? Held-out loss/perplexity (or accuracy) and prompt/reference scores, base vs adapted.

The base model is the tuned model with its adapters switched off (:func:`~runlora_nb.integrations.adapter_switch.adapters_disabled`), so nothing is
reloaded. Results are pandas DataFrames; given a run folder, they are also written there (atomically):
``eval_loss.csv``, ``eval_pairs.csv`` (with the greedy generations) and ``eval_summary.json``.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from torch import nn

from ..assets.hf import greedy_continuation
from ..assets.tokenized import batches
from ..common.metrics import perplexity
from ..common.paths import atomic_write_text
from ..integrations.adapter_switch import adapters_disabled
from ..train.metrics import batch_nll

__all__ = [
    "compare_adapters",
    "dataset_loss",
    "evaluate_pairs",
    "exact_match",
    "read_pairs",
    "rouge_l",
    "summarize_pairs",
]

PAIR_KEYS = ("prompt", "reference")


# ------------------------------------------------------------------------------------------------ toggling


@contextlib.contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(was)


# ------------------------------------------------------------------------------------------------ loss


def dataset_loss(model: nn.Module, dataset: Any, batch_size: int = 8, max_batches: int | None = None) -> dict:
    """Token-weighted loss and perplexity (causal LM) or loss and accuracy (classification) on ``dataset``.

    Args:
        model: a causal-LM or sequence-classification model.
        dataset: a :class:`~runlora_nb.assets.tokenized.TokenDataset` (labels (n, L) with -100 ignored, or (n,)
            class indices).
        batch_size: rows per forward.
        max_batches: stop after this many batches (None: the whole split).

    Returns:
        ``{"loss", "perplexity", "accuracy", "rows", "tokens"}``; ``accuracy`` is None for causal LMs and
        ``perplexity`` None for classification.

    Raises:
        ValueError: an empty dataset.
    """
    if len(dataset) == 0:
        raise ValueError("evaluate: the evaluation split is empty; lower seq_len or use a larger dataset")
    total = correct = rows = 0
    nll = 0.0
    with _eval_mode(model):
        for i, batch in enumerate(batches(dataset, batch_size, shuffle=False)):
            if max_batches is not None and i >= max_batches:
                break
            part = batch_nll(model, batch)
            rows += len(batch["labels"])
            nll, total, correct = nll + part.nll, total + part.count, correct + part.correct
    classification = dataset.tensors["labels"].dim() == 1
    loss = nll / max(total, 1)
    return {
        "loss": loss,
        "perplexity": None if classification else perplexity(loss),
        "accuracy": correct / max(total, 1) if classification else None,
        "rows": rows,
        "tokens": None if classification else total,
    }


def compare_adapters(
    model: nn.Module,
    dataset: Any,
    batch_size: int = 8,
    max_batches: int | None = None,
    run_dir: str | os.PathLike | None = None,
) -> pd.DataFrame:
    """:func:`dataset_loss` of the base (adapters off) and the adapted model.

    Returns:
        Two rows, ``variant`` ``base`` and ``adapted``, with ``loss``, ``perplexity``, ``accuracy``, ``rows``,
        ``tokens``; written to ``run_dir/eval_loss.csv`` when given.
    """
    with adapters_disabled(model):
        base = dataset_loss(model, dataset, batch_size, max_batches)
    adapted = dataset_loss(model, dataset, batch_size, max_batches)
    df = pd.DataFrame([{"variant": "base", **base}, {"variant": "adapted", **adapted}])
    if run_dir is not None:
        atomic_write_text(Path(run_dir) / "eval_loss.csv", df.to_csv(index=False))
    return df


# ------------------------------------------------------------------------------------------------ pairs


def read_pairs(path: str | os.PathLike) -> list[dict[str, str]]:
    """Read a JSONL file of ``{"prompt": ..., "reference": ...}`` objects (blank lines skipped).

    Raises:
        ValueError: a line that is not a JSON object, lacks a key or has a non-string value (the message names
            the file, the line number and the key), or a file with no pairs.
    """
    path = Path(path)
    pairs = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError as err:
            raise ValueError(f"evaluate: {path} line {n} is not valid JSON ({err})") from err
        if not isinstance(row, dict):
            raise ValueError(f"evaluate: {path} line {n} is a {type(row).__name__}, expected a JSON object")
        for key in PAIR_KEYS:
            if key not in row:
                raise ValueError(
                    f"evaluate: {path} line {n} has no {key!r} key (found {sorted(row)}); every line needs "
                    '{"prompt": ..., "reference": ...}'
                )
            if not isinstance(row[key], str):
                raise ValueError(
                    f"evaluate: {path} line {n}: {key!r} must be a string, got {type(row[key]).__name__}"
                )
        pairs.append({"prompt": row["prompt"], "reference": row["reference"]})
    if not pairs:
        raise ValueError(f"evaluate: {path} holds no prompt/reference pairs")
    return pairs


def _normalize(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip()


def exact_match(prediction: str, reference: str) -> float:
    """1.0 when the texts are equal after collapsing whitespace and stripping, else 0.0."""
    return float(_normalize(prediction) == _normalize(reference))


_SCORER = None


def rouge_l(prediction: str, reference: str) -> float:
    """ROUGE-L F-measure (the ``rouge-score`` package, no stemming)."""
    global _SCORER
    if _SCORER is None:
        from rouge_score import rouge_scorer

        _SCORER = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    return float(_SCORER.score(reference, prediction)["rougeL"].fmeasure)


def _encode(tokenizer: Any, prompt: str, chat: bool) -> dict[str, torch.Tensor]:
    if chat and getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
        )
        return tokenizer(text, return_tensors="pt", add_special_tokens=False)
    return tokenizer(prompt, return_tensors="pt")


def _generate(
    model: nn.Module, tokenizer: Any, prompts: Sequence[str], max_new_tokens: int, chat: bool
) -> list[str]:
    device = next(model.parameters()).device
    texts = []
    with _eval_mode(model):
        for prompt in prompts:
            ids = {k: v.to(device) for k, v in _encode(tokenizer, prompt, chat).items()}
            texts.append(greedy_continuation(model, tokenizer, ids, max_new_tokens))
    return texts


def evaluate_pairs(
    model: nn.Module,
    tokenizer: Any,
    pairs: str | os.PathLike | Sequence[dict[str, str]],
    max_new_tokens: int = 32,
    *,
    compare_base: bool = True,
    chat: bool = False,
    run_dir: str | os.PathLike | None = None,
) -> pd.DataFrame:
    """Greedy generations for each prompt, scored against its reference (exact match and ROUGE-L).

    Args:
        model: the tuned causal LM.
        tokenizer: its tokenizer.
        pairs: a JSONL path (see :func:`read_pairs`) or a list of ``{"prompt", "reference"}`` dicts.
        max_new_tokens: generation length.
        compare_base: also generate with the adapters off (rows with ``variant="base"``).
        chat: wrap each prompt in the tokenizer's chat template as a user turn.
        run_dir: also write ``eval_pairs.csv`` and ``eval_summary.json`` there.

    Returns:
        One row per (variant, pair): ``variant``, ``index``, ``prompt``, ``reference``, ``generation``,
        ``exact_match``, ``rouge_l``.

    Raises:
        ValueError: a malformed pairs file (line and key named).
    """
    rows_in = read_pairs(pairs) if isinstance(pairs, (str, os.PathLike)) else list(pairs)
    for i, row in enumerate(rows_in):
        missing = [k for k in PAIR_KEYS if k not in row]
        if missing:
            raise ValueError(
                f"evaluate: pair {i} has no {missing[0]!r} key; each needs 'prompt' and 'reference'"
            )
    prompts = [r["prompt"] for r in rows_in]
    variants = []
    if compare_base:
        with adapters_disabled(model):
            variants.append(("base", _generate(model, tokenizer, prompts, max_new_tokens, chat)))
    variants.append(("adapted", _generate(model, tokenizer, prompts, max_new_tokens, chat)))
    records = [
        {
            "variant": name,
            "index": i,
            "prompt": row["prompt"],
            "reference": row["reference"],
            "generation": gen,
            "exact_match": exact_match(gen, row["reference"]),
            "rouge_l": rouge_l(gen, row["reference"]),
        }
        for name, gens in variants
        for i, (row, gen) in enumerate(zip(rows_in, gens))
    ]
    df = pd.DataFrame(records)
    if run_dir is not None:
        atomic_write_text(Path(run_dir) / "eval_pairs.csv", df.to_csv(index=False))
        summary = summarize_pairs(df).to_dict(orient="records")
        atomic_write_text(Path(run_dir) / "eval_summary.json", json.dumps(summary, indent=2))
    return df


def summarize_pairs(df: pd.DataFrame) -> pd.DataFrame:
    """Mean exact match and ROUGE-L per variant (``base`` first)."""
    out = df.groupby("variant", sort=False)[["exact_match", "rouge_l"]].mean().reset_index()
    out["pairs"] = df.groupby("variant", sort=False).size().values
    return out
