"""Known third-party messages that say nothing to a runlora_nb user, filtered at their source.

Each filter sits on one logger and drops only the records whose message holds all of a few key words, so a
reworded notice is still caught while everything else from those loggers still shows.

- bitsandbytes (CPU backend), logged once at import by ``bitsandbytes.backends.cpu.ops`` on CPUs with AVX512-BF16:
  "Failed to load CPU gemm_4bit_forward from kernels-community: No module named 'kernels' …". It offers an
  optional Hub kernel (no network is used); bitsandbytes' own CPU kernels run instead. Any import of transformers'
  Trainer pulls bitsandbytes in, so every CLI run and every dashboard printed it. Dropped.
- bitsandbytes' int8 matmul: "MatMul8bitLt: inputs will be cast …", once per layer call. Shown once per process.
- kernels (>= 0.19), logged by ``kernels._internals.hf_hub`` when bitsandbytes asks it for that same Hub kernel
  with ``HF_HUB_OFFLINE=1``: "Skipping publisher trust check for '…' because Hugging Face Hub is in offline mode."
  runlora_nb always runs offline and never uses Hub kernels, so in JupyterLab it was a red line under the first
  cell that imported the package. Dropped.

The filters are installed when this module is imported, which the package does first (before anything of ours
imports bitsandbytes); if bitsandbytes was imported before runlora_nb, its import notice was already printed.
"""

from __future__ import annotations

import logging

__all__ = ["KNOWN_NOISE", "install"]

# (logger name, words the message must all contain (case-insensitive), let the first one through)
KNOWN_NOISE: tuple[tuple[str, tuple[str, ...], bool], ...] = (
    ("bitsandbytes.backends.cpu.ops", ("gemm_4bit_forward", "kernels-community"), False),
    ("bitsandbytes.autograd._functions", ("matmul8bitlt", "cast"), True),
    ("kernels._internals.hf_hub", ("trust", "offline"), False),
)


class _KnownNoise(logging.Filter):
    """Drops one known message of one logger (``once``: lets its first record through)."""

    def __init__(self, words: tuple[str, ...], once: bool) -> None:
        super().__init__()
        self.words, self.once, self.seen = tuple(w.lower() for w in words), once, False

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            text = record.getMessage().lower()
        except Exception:  # a record whose args do not fit its format: not ours to judge
            return True
        if not all(w in text for w in self.words):
            return True  # every other message of the logger is kept
        if self.once and not self.seen:
            self.seen = True
            return True
        return False


def install() -> None:
    """Attach the filters to their loggers (idempotent); runs when this module is imported."""
    for name, words, once in KNOWN_NOISE:
        logger = logging.getLogger(name)
        if not any(
            isinstance(f, _KnownNoise) and f.words == tuple(w.lower() for w in words) for f in logger.filters
        ):
            logger.addFilter(_KnownNoise(words, once))


install()
