"""Parity of an exported artefact with the in-memory tuned model: logits, greedy tokens, perplexity.

Every export (:mod:`runlora_nb.assess.export`) reloads what it wrote and runs :func:`parity_report` on a fixed
prompt set. The tolerance comes from the artefact's dtype and the reduction length of the network (rounding
errors of ``eps`` per element accumulate roughly like ``eps·sqrt(hidden·layers)``), scaled by the logits' size.
"""

from __future__ import annotations

import json
import math
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..common.paths import atomic_write_text

__all__ = ["PARITY_PROMPTS", "ParityWarning", "format_parity", "parity_report", "tolerance", "write_parity"]

PARITY_PROMPTS: tuple[str, ...] = (
    "The capital of France is",
    "Once upon a time, in a small village,",
    "def add(a, b):\n    return",
    "Shall I compare thee to a summer's day?",
)
PARITY_FILE = "parity.json"


class ParityWarning(UserWarning):
    """An exported artefact differs from the tuned model by more than its dtype's tolerance."""


def _dims(config: Any) -> tuple[int, int]:
    hidden = getattr(config, "hidden_size", None) or getattr(config, "n_embd", None) or 1
    layers = getattr(config, "num_hidden_layers", None) or getattr(config, "n_layer", None) or 1
    return int(hidden), int(layers)


def tolerance(dtype: torch.dtype, config: Any, scale: float = 1.0) -> float:
    """Largest max-abs logit difference expected from rounding to ``dtype``.

    ``16 · eps(dtype) · sqrt(hidden · layers) · max(1, scale)``: one rounding of ``eps`` per weight, errors
    adding up like a random walk over the reduction length of all layers, relative to the logit magnitude.

    Args:
        dtype: the artefact's weight dtype (its arithmetic precision).
        config: the model config (``hidden_size``/``num_hidden_layers`` or GPT-2's names).
        scale: max |logit| of the reference.

    Returns:
        The tolerance, in logit units.
    """
    hidden, layers = _dims(config)
    return 16.0 * torch.finfo(dtype).eps * math.sqrt(hidden * layers) * max(1.0, float(scale))


def _logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """(T, V) fp32 logits of one sequence ``ids`` (T,)."""
    device = next(model.parameters()).device
    out = model(input_ids=ids[None].to(device), attention_mask=torch.ones_like(ids)[None].to(device))
    return out.logits[0].float().cpu()


def _greedy(model: nn.Module, ids: torch.Tensor, n: int) -> list[int]:
    """``n`` greedy tokens after ``ids`` (no cache: exact and model-agnostic; prompts are short)."""
    seq = ids.clone()
    new = []
    for _ in range(n):
        nxt = int(_logits(model, seq)[-1].argmax())
        new.append(nxt)
        seq = torch.cat([seq, torch.tensor([nxt], dtype=seq.dtype)])
    return new


def _nll(logits: torch.Tensor, ids: torch.Tensor) -> tuple[float, int]:
    if len(ids) < 2:
        return 0.0, 0
    loss = torch.nn.functional.cross_entropy(logits[:-1], ids[1:], reduction="sum")
    return float(loss), len(ids) - 1


def _ppl(nll: float, n: int) -> float:
    return math.exp(min(nll / n, 50.0)) if n else math.nan


@torch.no_grad()
def parity_report(
    reference: nn.Module,
    candidate: nn.Module,
    tokenizer: Any,
    *,
    dtype: torch.dtype,
    label: str,
    prompts: Sequence[str] = PARITY_PROMPTS,
    new_tokens: int = 8,
    candidate_tokenizer: Any = None,
    causal: bool = True,
) -> dict[str, Any]:
    """Compare an artefact with the tuned model on ``prompts``; warn when beyond tolerance.

    Both models see the same token ids (the reference tokenizer's), so the logits compare the weights alone;
    a reloaded tokenizer, if given, is compared separately (same ids on every prompt).

    Args:
        reference: the in-memory tuned model.
        candidate: the reloaded artefact.
        tokenizer: the tuned model's tokenizer.
        dtype: the artefact's weight dtype (sets the tolerance).
        label: what is compared, e.g. ``"merged"``, for messages.
        prompts: the fixed prompt set.
        new_tokens: greedy tokens generated per prompt (causal LMs).
        candidate_tokenizer: the artefact's tokenizer, to check it encodes like the original.
        causal: False for classification heads (no perplexity or generation; argmax agreement only).

    Returns:
        A JSON-ready dict: ``max_logit_diff``, ``tolerance``, ``within_tolerance``, ``argmax_agreement``
        (teacher-forced positions), ``greedy_agreement`` (generated tokens), ``ppl_reference``,
        ``ppl_export``, ``ppl_change`` (relative), ``tokenizer_match``, ``dtype``, ``prompts``.
    """
    modes = reference.training, candidate.training
    reference.eval()
    candidate.eval()
    try:
        diff = scale = 0.0
        agree = total = g_agree = g_total = 0
        nll_r = nll_c = 0.0
        n_tok = 0
        tok_match = True
        for prompt in prompts:
            ids = torch.as_tensor(tokenizer(prompt)["input_ids"], dtype=torch.long)
            if candidate_tokenizer is not None:
                tok_match &= list(candidate_tokenizer(prompt)["input_ids"]) == ids.tolist()
            lr, lc = _logits(reference, ids), _logits(candidate, ids)
            diff = max(diff, float((lr - lc).abs().max()))
            scale = max(scale, float(lr.abs().max()))
            agree += int((lr.argmax(-1) == lc.argmax(-1)).sum())
            total += lr.shape[0]
            if causal:
                a, n = _nll(lr, ids)
                b, _ = _nll(lc, ids)
                nll_r, nll_c, n_tok = nll_r + a, nll_c + b, n_tok + n
                gr, gc = _greedy(reference, ids, new_tokens), _greedy(candidate, ids, new_tokens)
                g_agree += sum(x == y for x, y in zip(gr, gc))
                g_total += new_tokens
    finally:
        reference.train(modes[0])
        candidate.train(modes[1])
    tol = tolerance(dtype, getattr(reference, "config", None), scale)
    ppl_r, ppl_c = _ppl(nll_r, n_tok), _ppl(nll_c, n_tok)
    report = {
        "export": label,
        "dtype": str(dtype).removeprefix("torch."),
        "prompts": len(prompts),
        "max_logit_diff": diff,
        "logit_scale": scale,
        "tolerance": tol,
        "within_tolerance": diff <= tol,
        "argmax_agreement": agree / max(total, 1),
        "greedy_agreement": (g_agree / g_total) if g_total else None,
        "ppl_reference": ppl_r,
        "ppl_export": ppl_c,
        "ppl_change": (ppl_c - ppl_r) / ppl_r if causal and ppl_r else None,
        "tokenizer_match": tok_match if candidate_tokenizer is not None else None,
    }
    if not report["within_tolerance"]:
        warnings.warn(
            f"parity ({label}): max logit difference {diff:.3g} exceeds the {report['dtype']} tolerance "
            f"{tol:.3g}; greedy agreement {report['greedy_agreement']}, perplexity change "
            f"{report['ppl_change']}. The artefact does not behave like the tuned model.",
            ParityWarning,
            stacklevel=2,
        )
    if report["tokenizer_match"] is False:
        warnings.warn(
            f"parity ({label}): the exported tokenizer encodes the parity prompts differently",
            ParityWarning,
            stacklevel=2,
        )
    return report


def format_parity(report: dict[str, Any]) -> str:
    """One printable line per figure."""
    keys = ("max_logit_diff", "tolerance", "argmax_agreement", "greedy_agreement", "ppl_change")
    parts = [
        f"{k}={report[k]:.4g}" if isinstance(report.get(k), float) else f"{k}={report.get(k)}" for k in keys
    ]
    status = "OK" if report["within_tolerance"] else "BEYOND TOLERANCE"
    return f"parity {report['export']} ({report['dtype']}): {status}; " + ", ".join(parts)


def write_parity(folder: str | Path, report: dict[str, Any]) -> Path:
    """Write ``parity.json`` into ``folder`` atomically."""
    return atomic_write_text(
        Path(folder) / PARITY_FILE, json.dumps(report, indent=2, sort_keys=True, default=str)
    )
