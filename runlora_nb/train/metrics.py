"""The summed negative log-likelihood of one batch: the one loss both the engine and ``assess`` average.

Validation loss is the mean over every target token (for classification, every row) of the split, so it is
computed from sums and counts, never as a mean of per-batch means (those weigh a batch with much padding as
much as a full one).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn
from torch.nn import functional as F

__all__ = ["BatchNLL", "batch_nll"]


class BatchNLL(NamedTuple):
    """Sums over one batch: ``nll`` (nats), ``count`` (target tokens, or rows for classification), ``correct``
    (rows whose argmax is the label; 0 for causal LMs)."""

    nll: float
    count: int
    correct: int


@torch.no_grad()
def batch_nll(model: nn.Module, batch: dict[str, torch.Tensor]) -> BatchNLL:
    """Summed NLL of ``batch`` under ``model`` (logits in fp32, padding and prompt labels ``-100`` ignored).

    Args:
        model: a causal LM (labels (B, L), next-token targets) or a sequence classifier (labels (B,)).
        batch: ``input_ids`` (B, L), ``attention_mask`` (B, L) and ``labels``; moved to the model's device.
    """
    device = next(model.parameters()).device
    batch = {k: v.to(device) for k, v in batch.items()}
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
    labels = batch["labels"]
    if labels.dim() == 1:  # classification: logits (B, C)
        nll = float(F.cross_entropy(logits, labels, reduction="sum"))
        return BatchNLL(nll, len(labels), int((logits.argmax(-1) == labels).sum()))
    shift, target = logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten()  # (B·(L-1), V), (B·(L-1),)
    nll = float(F.cross_entropy(shift, target, ignore_index=-100, reduction="sum"))
    return BatchNLL(nll, int((target != -100).sum()), 0)
