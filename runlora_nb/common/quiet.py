"""Known third-party messages that say nothing to a runlora_nb user, filtered at their source.

Only exact, known messages are dropped; everything else from those libraries still shows.

- bitsandbytes (CPU backend), logged once at import by ``bitsandbytes.backends.cpu.ops`` on CPUs with AVX512-BF16:
  "Failed to load CPU gemm_4bit_forward from kernels-community: No module named 'kernels' …". It offers an
  optional Hub kernel (the Hub is unreachable here); bitsandbytes' own CPU kernels run instead. Any import of
  transformers' Trainer pulls bitsandbytes in, so every CLI run and every dashboard printed it.
"""

from __future__ import annotations

import logging

__all__ = ["KNOWN_NOISE", "install"]

# logger name → message prefixes that are dropped
KNOWN_NOISE: dict[str, tuple[str, ...]] = {
    "bitsandbytes.backends.cpu.ops": ("Failed to load CPU gemm_4bit_forward from kernels-community",),
}


class _DropKnown(logging.Filter):
    def __init__(self, prefixes: tuple[str, ...]) -> None:
        super().__init__()
        self.prefixes = prefixes

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.prefixes)


def install() -> None:
    """Attach the filters to their loggers (idempotent); runs when this module is imported."""
    for name, prefixes in KNOWN_NOISE.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropKnown) for f in logger.filters):
            logger.addFilter(_DropKnown(prefixes))


install()
