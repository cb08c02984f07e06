"""One definition of each run metric: perplexity from a token-weighted loss, and steady-state throughput.

Every place that reports these (the engine's evaluations, ``assess.evaluate``, the run ledger, the HF Trainer
callback, the panels, run comparisons, sweeps) calls these functions, so two views of one run never disagree.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable

__all__ = ["MAX_LOG_PERPLEXITY", "perplexity", "steady_tokens_per_s"]

#: Above this mean NLL (nats per token) ``exp`` overflows a float64: the perplexity is reported as inf.
MAX_LOG_PERPLEXITY = 709.0


def perplexity(loss: float | None) -> float:
    """``exp(loss)`` of a token-weighted mean NLL (nats per token).

    No clamp hides a bad run: a loss above :data:`MAX_LOG_PERPLEXITY` gives ``inf``, a NaN or missing loss
    gives NaN.
    """
    if loss is None or math.isnan(loss):
        return math.nan
    return math.exp(loss) if loss <= MAX_LOG_PERPLEXITY else math.inf


def steady_tokens_per_s(rates: Iterable[float]) -> float:
    """Median tokens/s of the steps after the first (the first includes planning and warm-up).

    With one step, that step's rate; with none, NaN. Non-finite rates are left out. The median is the
    ordinary one (the mean of the two middle values for an even count).
    """
    values = [math.nan if r is None else float(r) for r in rates]  # None: a rate the ledger could not store
    steady = values[1:] or values
    steady = [r for r in steady if math.isfinite(r)]
    return statistics.median(steady) if steady else math.nan
