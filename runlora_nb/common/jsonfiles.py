"""JSON files and lines that survive NaN and a kill mid-write.

``json.dumps`` writes bare ``NaN`` (not JSON) and a crash mid-write leaves half a file; these helpers write
through a temporary file and ``os.replace`` and turn non-finite floats into ``None`` or strings.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from .paths import atomic_write_text

__all__ = ["finite_or_none", "json_default", "read_json_dict", "write_json"]


def json_default(v: Any) -> Any:
    """``json.dumps(default=...)`` for what JSON has no type for: tuples and sets as lists, the rest as text."""
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    if isinstance(v, tuple | set):
        return list(v)
    return str(v)


def write_json(path: Path, data: dict) -> None:
    """Write ``data`` to ``path`` atomically (indented, keys sorted)."""
    atomic_write_text(path, json.dumps(data, indent=1, sort_keys=True, default=json_default))


def read_json_dict(path: Path) -> dict:
    """The JSON object in ``path``, or ``{}`` when the file is missing, unreadable, not JSON or not an object."""
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return {}
    return data if isinstance(data, dict) else {}


def finite_or_none(value: Any) -> Any:
    """NaN/inf become None (JSON lines must not hold bare NaN); anything else is returned as it is."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value
