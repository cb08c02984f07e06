"""Training guards: checks the engine runs on its own events; what they find becomes a warning event.

A causal LM that predicts the uniform distribution over its vocabulary has loss ln(vocab). A run whose loss stays
within 1% of that for the whole first evaluation window learned nothing (typically an lr far too large, which
saturates the logits, or far too small); :class:`UniformLossGuard` says so once. The engine turns the message
into a :class:`~runlora_nb.train.events.WarningEvent` (the run ledger records those in ``status.json``) and a
``RuntimeWarning``.
"""

from __future__ import annotations

import math

from .config import FineTuneConfig
from .events import StepEvent

__all__ = ["UniformLossGuard", "vocab_size"]


def vocab_size(model) -> int | None:
    """Rows of the model's output embedding (its vocabulary), or None when it has none."""
    try:
        out = model.get_output_embeddings()
    except (AttributeError, NotImplementedError):
        out = None
    weight = getattr(out, "weight", None)
    if weight is not None and weight.dim() == 2:
        return int(weight.shape[0])
    size = getattr(getattr(model, "config", None), "vocab_size", None)
    return int(size) if size else None


class UniformLossGuard:
    """Finds a train loss that stays within ``tolerance`` (relative) of ln(vocab) for the first eval window.

    Args:
        config: the run (its eval interval and steps give the window; its lr goes into the advice).
        vocab: the model's vocabulary size; None (classification, or unknown) turns the guard off.
        tolerance: relative band around ln(vocab) (default 1%).
    """

    def __init__(self, config: FineTuneConfig, vocab: int | None, tolerance: float = 0.01) -> None:
        self.tolerance = tolerance
        self.lr = config.lr
        self._uniform = math.log(vocab) if vocab and vocab > 1 else None
        self._window = min(config.eval_interval or config.steps, config.steps)
        self._stuck = True

    def check(self, event: StepEvent) -> str | None:
        """The warning, once, at the end of the window when every loss in it was the uniform guess; else None."""
        if self._uniform is None or event.step > self._window:
            return None
        if not (abs(event.loss - self._uniform) <= self.tolerance * self._uniform):
            self._stuck = False
        if event.step == self._window and self._stuck:
            return (
                f"FineTuner: the train loss stayed within {self.tolerance:.0%} of ln(vocab) = "
                f"{self._uniform:.3f} (the uniform guess) for all of steps 1-{self._window}: the model is not "
                f"learning; lr={self.lr:g} is probably far too large (or too small) — try 1e-4 to 3e-3"
            )
        return None
