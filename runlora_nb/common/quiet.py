"""Known third-party messages that say nothing to a runlora_nb user, filtered at their source (issue 14 defect 17).

Only exact, known messages are touched; everything else from those loggers still shows.

- bitsandbytes (CPU backend), logged once at import by ``bitsandbytes.backends.cpu.ops`` on CPUs with AVX512-BF16:
  "Failed to load CPU gemm_4bit_forward from kernels-community: No module named 'kernels' …". It offers an
  optional Hub kernel (no network is used); bitsandbytes' own CPU kernels run instead. Any import of transformers'
  Trainer pulls bitsandbytes in, so every CLI run and every dashboard printed it. Dropped.
- bitsandbytes' int8 matmul: "MatMul8bitLt: inputs will be cast …", once per layer call. Shown once per process.

The filters are installed when this module is imported, which the package does first (before anything of ours
imports bitsandbytes); if bitsandbytes was imported before runlora_nb, its import notice was already printed.
"""

from __future__ import annotations

import logging

__all__ = ["KNOWN_NOISE", "install"]

# (logger name, message prefix, let the first one through)
KNOWN_NOISE: tuple[tuple[str, str, bool], ...] = (
    ("bitsandbytes.backends.cpu.ops", "Failed to load CPU gemm_4bit_forward from kernels-community", False),
    ("bitsandbytes.autograd._functions", "MatMul8bitLt: inputs will be cast", True),
)


class _KnownNoise(logging.Filter):
    """Drops one known message of one logger (``once``: lets its first record through)."""

    def __init__(self, prefix: str, once: bool) -> None:
        super().__init__()
        self.prefix, self.once, self.seen = prefix, once, False

    def filter(self, record: logging.LogRecord) -> bool:
        if not str(record.msg).startswith(self.prefix):
            return True  # every other message of the logger is kept
        if self.once and not self.seen:
            self.seen = True
            return True
        return False


def install() -> None:
    """Attach the filters to their loggers (idempotent); runs when this module is imported."""
    for name, prefix, once in KNOWN_NOISE:
        logger = logging.getLogger(name)
        if not any(isinstance(f, _KnownNoise) and f.prefix == prefix for f in logger.filters):
            logger.addFilter(_KnownNoise(prefix, once))


install()
