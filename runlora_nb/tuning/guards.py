"""Training guards that listen to the engine's events and warn: a loss stuck at the uniform guess.

A causal LM that predicts the uniform distribution over its vocabulary has loss ln(vocab). A run whose loss stays
within 1% of that for the whole first evaluation window learned nothing (typically an lr far too large, which
saturates the logits, or far too small); :class:`UniformLossGuard` says so once, as a ``RuntimeWarning`` and in
``trainer.history.warnings`` (the run ledger records those in ``status.json``).
"""

from __future__ import annotations

import math
import warnings

from .events import Callback

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


class UniformLossGuard(Callback):
    """Warn when the train loss stays within ``tolerance`` (relative) of ln(vocab) for the first eval window.

    Args:
        tolerance: relative band around ln(vocab) (default 1%).
    """

    def __init__(self, tolerance: float = 0.01) -> None:
        self.tolerance = tolerance
        self._uniform: float | None = None
        self._window = 0
        self._stuck = True

    def on_start(self, trainer, event) -> None:
        vocab = None if trainer.label_names else vocab_size(trainer.model)
        self._uniform = math.log(vocab) if vocab and vocab > 1 else None
        cfg = event.config
        self._window = min(cfg.eval_interval or cfg.steps, cfg.steps)
        self._stuck = True

    def on_step(self, trainer, event) -> None:
        if self._uniform is None or event.step > self._window:
            return
        if not (abs(event.loss - self._uniform) <= self.tolerance * self._uniform):
            self._stuck = False
        if event.step == self._window and self._stuck:
            msg = (
                f"FineTuner: the train loss stayed within {self.tolerance:.0%} of ln(vocab) = "
                f"{self._uniform:.3f} (the uniform guess) for all of steps 1-{self._window}: the model is not "
                f"learning; lr={trainer.config.lr:g} is probably far too large (or too small) — try 1e-4 to 3e-3"
            )
            trainer.history.warnings.append(msg)
            warnings.warn(msg, RuntimeWarning, stacklevel=2)
