"""argparse type functions and the parser class of ``runlora-nb``: bad arguments become one clean line."""

from __future__ import annotations

import argparse
import sys
from typing import NoReturn

__all__ = ["CleanParser", "device", "dropout", "needs", "nonneg_int", "positive_float", "positive_int"]

NEEDS = ("dx", "da", "db")


class CleanParser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line, ``runlora-nb: error: …``, with exit status 2."""

    def error(self, message: str) -> NoReturn:
        print(f"runlora-nb: error: {message} (see `{self.prog} --help`)", file=sys.stderr)
        raise SystemExit(2)


def _int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None


def positive_int(text: str) -> int:
    """An integer ≥ 1.

    Raises:
        argparse.ArgumentTypeError: not an integer, or < 1.
    """
    value = _int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer (>= 1), got {text!r}")
    return value


def nonneg_int(text: str) -> int:
    """An integer ≥ 0.

    Raises:
        argparse.ArgumentTypeError: not an integer, or < 0.
    """
    value = _int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be an integer >= 0, got {text!r}")
    return value


def positive_float(text: str) -> float:
    """A number > 0.

    Raises:
        argparse.ArgumentTypeError: not a number, or <= 0.
    """
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be a positive number (> 0), got {text!r}")
    return value


def dropout(text: str) -> float:
    """A dropout probability p with 0 <= p < 1.

    Raises:
        argparse.ArgumentTypeError: not a number, or outside [0, 1).
    """
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1), got {text!r}") from None
    if not 0.0 <= value < 1.0:
        raise argparse.ArgumentTypeError(f"must be in [0, 1) (a probability), got {text!r}")
    return value


def needs(text: str) -> str:
    """A comma list of gradients among dX, dA, dB (at least one), normalised to lower case.

    Raises:
        argparse.ArgumentTypeError: an unknown name or an empty list.
    """
    wanted = [s.strip().lower() for s in text.split(",") if s.strip()]
    unknown = [s for s in wanted if s not in NEEDS]
    if unknown or not wanted:
        raise argparse.ArgumentTypeError(
            f"must be a comma list of dX, dA, dB (e.g. dX,dA,dB or dA,dB), got {text!r}"
        )
    return ",".join(wanted)


def device(text: str) -> str:
    """``cpu`` or ``cuda[:k]``, and only a CUDA device this torch build and machine have.

    Raises:
        argparse.ArgumentTypeError: unknown device, or CUDA not available here.
    """
    import torch

    try:
        dev = torch.device(text)
    except RuntimeError:
        raise argparse.ArgumentTypeError(f"expected cpu or cuda, got {text!r}") from None
    if dev.type not in ("cpu", "cuda"):
        raise argparse.ArgumentTypeError(f"expected cpu or cuda, got {text!r}")
    if dev.type == "cuda" and not torch.cuda.is_available():
        build = (
            "a CPU-only build" if torch.version.cuda is None else f"CUDA {torch.version.cuda}, no GPU visible"
        )
        raise argparse.ArgumentTypeError(
            f"{text!r} is not available here (torch {torch.__version__}: {build}); use --device cpu"
        )
    return text
