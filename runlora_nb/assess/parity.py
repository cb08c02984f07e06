"""Parity of an exported artefact with the in-memory tuned model: logits, greedy tokens, perplexity.

Every export (:mod:`runlora_nb.assess.export`) reloads what it wrote and runs :func:`parity_report` on a fixed
prompt set. The logits must agree normwise, relative to their own norm, within a rounding bound of the coarser
of the export's and the weights' dtype over the reduction length (hidden size), so a larger logit scale does
not widen it; next-token argmax, greedy generation and perplexity must agree too (:func:`parity_report`).
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

from ..common.metrics import perplexity
from ..common.numerics import rounding_bound
from ..common.paths import atomic_write_text

__all__ = [
    "ARGMAX_MIN",
    "LOGIT_DEPTH",
    "PARITY_PROMPTS",
    "PPL_RTOL",
    "TOKENIZER_TEXTS",
    "ParityWarning",
    "format_parity",
    "logit_bound",
    "parity_report",
    "tokenizer_parity",
    "write_parity",
]

PARITY_PROMPTS: tuple[str, ...] = (
    "The capital of France is",
    "Once upon a time, in a small village,",
    "def add(a, b):\n    return",
    "Shall I compare thee to a summer's day?",
)
PARITY_FILE = "parity.json"

#: Texts the exported tokenizer must encode exactly as the tuned model's does: the cases where tokenizers
#: part ways (contractions, digit runs, accents and CJK, code, whitespace runs, an empty string); the
#: tokenizer's own special tokens are added by :func:`tokenizer_parity`.
TOKENIZER_TEXTS: tuple[str, ...] = (
    *PARITY_PROMPTS,
    "Shall I compare thee to a summer's day? It's, we'll, they're, don't, I'd",
    "12345 3.14159 1,000,000 2026-12-08 0x1F",
    "naïve café 北京 Ünïcödé — “quotes” emoji 🙂",
    "def f(x): return x**2\n\tif x != 0:\n\t\tprint(f'{x=}')",
    "two  spaces,   three,\t\ttabs,\n\n\nnewlines   ",
    " leading space",
    "",
)


class ParityWarning(UserWarning):
    """An exported artefact fails one of the parity checks (logit bound, argmax, greedy, perplexity, tokenizer)."""


#: How many matrix products' worth of rounding (:func:`~runlora_nb.common.numerics.rounding_bound` with the
#: export dtype as accumulator, i.e. ``LOGIT_DEPTH · (2·√hidden + 1) · u``) the logits may carry. Rounding a
#: weight to ``dtype`` perturbs each term of a reduction by ``u``, which is an accumulation error in ``dtype``;
#: errors of earlier blocks reach the logits through the residual stream, so the normwise relative error stays
#: a few products' worth rather than growing with depth. Measured on tiny-llama (hidden 128): intact exports
#: reach 4e-7 (f32), 6e-4 (f16), 4e-3 (bf16) against bounds of 5.6e-6, 0.046, 0.37; a copy with the MLP of
#: its last block zeroed reaches 0.19. The bound is loose for bf16, hence the argmax, greedy and perplexity
#: checks beside it.
LOGIT_DEPTH = 4

#: Least fraction of teacher-forced positions whose next-token argmax must agree. Rounding flips an argmax only
#: at a near-tie; bf16's coarser rounding meets more of them.
ARGMAX_MIN = {torch.float32: 0.99, torch.float16: 0.99, torch.bfloat16: 0.95}

#: Largest relative perplexity change on the parity prompts. Intact exports move it by 2e-5 (f16) and 2e-4
#: (bf16) on tiny-llama; a change of a percent or more is a model that behaves differently.
PPL_RTOL = {torch.float32: 1e-3, torch.float16: 1e-2, torch.bfloat16: 5e-2}


def _dims(config: Any) -> tuple[int, int]:
    hidden = getattr(config, "hidden_size", None) or getattr(config, "n_embd", None) or 1
    layers = getattr(config, "num_hidden_layers", None) or getattr(config, "n_layer", None) or 1
    return int(hidden), int(layers)


def _known(dtype: torch.dtype) -> torch.dtype:
    if dtype not in ARGMAX_MIN:
        raise TypeError(
            f"parity: no parity thresholds for dtype {dtype}; pass torch.float32, torch.float16 or torch.bfloat16"
        )
    return dtype


def logit_bound(dtype: torch.dtype, config: Any) -> float:
    """Largest normwise relative logit difference ``‖z_export − z_ref‖₂ / ‖z_ref‖₂`` rounding may cause.

    ``rounding_bound(dtype, hidden, LOGIT_DEPTH, accumulate=dtype)`` ≈ ``LOGIT_DEPTH · eps · √hidden``: see
    :data:`LOGIT_DEPTH`. Being relative to the logits' norm, it does not grow with their magnitude.

    Args:
        dtype: the coarser of the export's and the model's weight dtype.
        config: the model config (``hidden_size`` or GPT-2's ``n_embd``: the reduction length).

    Returns:
        The bound, a float in (0, 1) for the supported dtypes and hidden sizes.

    Raises:
        TypeError: ``dtype`` is not float32, float16 or bfloat16.
    """
    hidden, _ = _dims(config)
    return rounding_bound(_known(dtype), hidden, LOGIT_DEPTH, accumulate=dtype)


def tokenizer_parity(
    reference: Any, candidate: Any, texts: Sequence[str] = TOKENIZER_TEXTS
) -> tuple[bool, str | None]:
    """Whether ``candidate`` encodes every text to the same ids as ``reference``, and the first that differs.

    The texts are ``texts`` plus one made of the reference's special tokens (BOS, EOS, padding, ...) around
    plain words, so a special token the export lost or split shows up too.

    Args:
        reference: the tuned model's tokenizer.
        candidate: the exported artefact's tokenizer.
        texts: the texts to encode.

    Returns:
        ``(True, None)`` when all agree, else ``(False, text)`` with the first differing text.
    """
    specials = [t for t in getattr(reference, "all_special_tokens", []) if t]
    extra = (" word ".join(specials) + " end",) if specials else ()
    for text in (*texts, *extra):
        if list(candidate(text)["input_ids"]) != list(reference(text)["input_ids"]):
            return False, text
    return True, None


def _logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """(T, V) fp32 logits of one sequence ``ids`` (T,)."""
    device = next(model.parameters()).device
    out = model(input_ids=ids[None].to(device), attention_mask=torch.ones_like(ids)[None].to(device))
    return out.logits[0].float().cpu()


def _greedy(model: nn.Module, ids: torch.Tensor, n: int) -> tuple[list[int], list[float]]:
    """``n`` greedy tokens after ``ids`` and, per step, the top-1 minus top-2 logit margin over the RMS of the
    step's logits (no cache: exact and model-agnostic; prompts are short)."""
    seq = ids.clone()
    new, margins = [], []
    for _ in range(n):
        row = _logits(model, seq)[-1]
        top = row.topk(2).values
        new.append(int(row.argmax()))
        rms = float(row.norm()) / math.sqrt(row.numel())
        margins.append(float(top[0] - top[1]) / max(rms, 1e-30))
        seq = torch.cat([seq, torch.tensor([new[-1]], dtype=seq.dtype)])
    return new, margins


def _greedy_ok(ref: list[int], got: list[int], margins: list[float], bound: float) -> bool:
    """Whether two greedy continuations agree, or part where rounding could flip the reference's choice.

    Read elementwise, a relative logit error of ``bound`` moves each logit by about ``bound·RMS(z)``, and two
    logits apart by twice that; a divergence where the reference's top-2 margin is below ``2·bound·RMS(z)``
    is a near-tie rounding may flip, not a different model. (The rigorous ``2·bound·‖z‖₂`` would excuse
    almost any divergence over a large vocabulary.)
    """
    for a, b, m in zip(ref, got, margins):
        if a != b:
            return m <= 2 * bound
    return True


def _nll(logits: torch.Tensor, ids: torch.Tensor) -> tuple[float, int]:
    if len(ids) < 2:
        return 0.0, 0
    loss = torch.nn.functional.cross_entropy(logits[:-1], ids[1:], reduction="sum")
    return float(loss), len(ids) - 1


def _ppl(nll: float, n: int) -> float:
    return perplexity(nll / n) if n else math.nan


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
    """Compare an artefact with the tuned model on ``prompts``; warn when any check fails.

    Both models see the same token ids (the reference tokenizer's), so the logits compare the weights alone;
    a reloaded tokenizer, if given, is compared separately. ``ok`` needs every check to pass:

    - ``logit``: ``‖z_c − z_r‖₂ / ‖z_r‖₂`` over all prompts' (T, V) logits ≤ :func:`logit_bound`;
    - ``argmax``: next-token argmax agreement on teacher-forced positions ≥ :data:`ARGMAX_MIN` of ``dtype``;
    - ``greedy`` (causal): each prompt's ``new_tokens`` greedy tokens agree, or first part at a near-tie of
      the reference (top-2 margin ≤ 2 · bound · RMS(z));
    - ``perplexity`` (causal): ``|ppl_c / ppl_r − 1|`` ≤ :data:`PPL_RTOL` of ``dtype``;
    - ``tokenizer`` (when ``candidate_tokenizer`` is given): same ids on every text of :func:`tokenizer_parity`.

    Args:
        reference: the in-memory tuned model.
        candidate: the reloaded artefact.
        tokenizer: the tuned model's tokenizer.
        dtype: the coarser of the artefact's and the model's weight dtype (sets the bound and thresholds).
        label: what is compared, e.g. ``"merged"``, for messages.
        prompts: the fixed prompt set.
        new_tokens: greedy tokens generated per prompt (causal LMs).
        candidate_tokenizer: the artefact's tokenizer, to check it encodes ``prompts`` and
            :data:`TOKENIZER_TEXTS` like the original (:func:`tokenizer_parity`).
        causal: False for classification heads (no perplexity or generation; logits and argmax only).

    Returns:
        A JSON-ready dict: ``ok``, ``failed`` (names of the failed checks), ``rel_logit_diff``,
        ``logit_bound``, ``max_logit_diff`` (for information), ``argmax_agreement``, ``argmax_min``,
        ``greedy_agreement`` (fraction of generated tokens), ``greedy_match`` (per the rule above),
        ``ppl_reference``, ``ppl_export``, ``ppl_change`` (relative), ``ppl_rtol``, ``tokenizer_match``,
        ``tokenizer_first_difference`` (the first text encoded differently, or None), ``dtype``, ``prompts``.

    Raises:
        TypeError: ``dtype`` is not float32, float16 or bfloat16.
    """
    bound = logit_bound(dtype, getattr(reference, "config", None))
    modes = reference.training, candidate.training
    reference.eval()
    candidate.eval()
    try:
        diff = sq_diff = sq_ref = 0.0
        agree = total = g_agree = g_total = 0
        greedy_match = True
        nll_r = nll_c = 0.0
        n_tok = 0
        for prompt in prompts:
            ids = torch.as_tensor(tokenizer(prompt)["input_ids"], dtype=torch.long)
            lr, lc = _logits(reference, ids), _logits(candidate, ids)
            diff = max(diff, float((lr - lc).abs().max()))
            sq_diff += float(((lr - lc).double() ** 2).sum())
            sq_ref += float((lr.double() ** 2).sum())
            agree += int((lr.argmax(-1) == lc.argmax(-1)).sum())
            total += lr.shape[0]
            if causal:
                a, n = _nll(lr, ids)
                b, _ = _nll(lc, ids)
                nll_r, nll_c, n_tok = nll_r + a, nll_c + b, n_tok + n
                (gr, margins), (gc, _) = (
                    _greedy(reference, ids, new_tokens),
                    _greedy(candidate, ids, new_tokens),
                )
                g_agree += sum(x == y for x, y in zip(gr, gc))
                g_total += new_tokens
                greedy_match &= _greedy_ok(gr, gc, margins, bound)
    finally:
        reference.train(modes[0])
        candidate.train(modes[1])
    tok_match, tok_diff = (
        tokenizer_parity(tokenizer, candidate_tokenizer, (*prompts, *TOKENIZER_TEXTS))
        if candidate_tokenizer is not None
        else (True, None)
    )
    rel = math.sqrt(sq_diff / sq_ref) if sq_ref else (0.0 if sq_diff == 0 else math.inf)
    ppl_r, ppl_c = _ppl(nll_r, n_tok), _ppl(nll_c, n_tok)
    ppl_change = (ppl_c - ppl_r) / ppl_r if causal and ppl_r else None
    argmax = agree / max(total, 1)
    checks = {
        "logit": rel <= bound,
        "argmax": argmax >= ARGMAX_MIN[dtype],
        "greedy": greedy_match if causal else True,
        "perplexity": abs(ppl_change) <= PPL_RTOL[dtype] if ppl_change is not None else True,
        "tokenizer": tok_match,
    }
    failed = [name for name, passed in checks.items() if not passed]
    report = {
        "export": label,
        "dtype": str(dtype).removeprefix("torch."),
        "prompts": len(prompts),
        "ok": not failed,
        "failed": failed,
        "rel_logit_diff": rel,
        "logit_bound": bound,
        "max_logit_diff": diff,
        "argmax_agreement": argmax,
        "argmax_min": ARGMAX_MIN[dtype],
        "greedy_agreement": (g_agree / g_total) if g_total else None,
        "greedy_match": greedy_match if causal else None,
        "ppl_reference": ppl_r,
        "ppl_export": ppl_c,
        "ppl_change": ppl_change,
        "ppl_rtol": PPL_RTOL[dtype] if causal else None,
        "tokenizer_match": tok_match if candidate_tokenizer is not None else None,
        "tokenizer_first_difference": tok_diff,
    }
    if failed:
        warnings.warn(
            f"{format_parity(report)}. The artefact does not behave like the tuned model.",
            ParityWarning,
            stacklevel=2,
        )
    return report


def _fig(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def format_parity(report: dict[str, Any]) -> str:
    """One printable line: the verdict, then each figure beside its threshold, failed checks marked."""
    failed = set(report.get("failed", ()))
    figures = [
        ("logit", f"rel_logit_diff={_fig(report['rel_logit_diff'])} (bound {_fig(report['logit_bound'])})"),
        ("argmax", f"argmax_agreement={_fig(report['argmax_agreement'])} (min {report['argmax_min']})"),
        ("greedy", f"greedy_agreement={_fig(report['greedy_agreement'])} (match {report['greedy_match']})"),
        ("perplexity", f"ppl_change={_fig(report['ppl_change'])} (rtol {report['ppl_rtol']})"),
        ("tokenizer", f"tokenizer_match={report['tokenizer_match']}"),
    ]
    parts = [text + (" FAILED" if name in failed else "") for name, text in figures]
    if report.get("tokenizer_first_difference") is not None:
        parts[-1] += f" (first differing text {report['tokenizer_first_difference']!r})"
    status = "OK" if report["ok"] else "FAILED (" + ", ".join(report["failed"]) + ")"
    return f"parity {report['export']} ({report['dtype']}): {status}; " + ", ".join(parts)


def write_parity(folder: str | Path, report: dict[str, Any]) -> Path:
    """Write ``parity.json`` into ``folder`` atomically."""
    return atomic_write_text(
        Path(folder) / PARITY_FILE, json.dumps(report, indent=2, sort_keys=True, default=str)
    )
