"""Reading a user's own text: ``.txt`` files and ``.jsonl`` records (text, prompt/response, instruction/input/output)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

__all__ = ["clean_text", "normalise_record", "read_jsonl", "read_text_file"]


# --------------------------------------------------------------------------------------------- reading


def clean_text(text: str) -> str:
    """Normalise newlines and strip trailing spaces on every line."""
    lines = text.replace("\r\n", "\n").replace("\r", "\n").split("\n")
    return "\n".join(line.rstrip() for line in lines).strip("\n") + "\n"


def read_text_file(path: Path) -> str:
    """Read a UTF-8 text file (a leading UTF-8 byte-order mark, as Windows editors write, is dropped).

    Raises:
        ValueError: missing, a folder, unreadable, not UTF-8, or empty (whitespace only).
    """
    if not path.exists():
        raise ValueError(
            f"Dataset file {path} does not exist. Pass an existing .txt / .jsonl file or a dataset name."
        )
    if path.is_dir():
        raise ValueError(f"{path} is a folder; pass a .txt or .jsonl file.")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        raise ValueError(
            f"{path} is not UTF-8 text ({exc.reason} at byte {exc.start}); re-save it as UTF-8."
        ) from exc
    except OSError as exc:
        raise ValueError(
            f"Cannot read {path} ({exc.strerror or exc}); check the path and its permissions."
        ) from exc
    if not text.strip():
        raise ValueError(f"{path} is empty; a dataset file needs at least one non-blank line.")
    return text


def normalise_record(obj: Any, where: str) -> dict[str, str]:
    """Map one JSONL object to ``{"text"}`` or ``{"prompt", "response", "category"}``.

    Raises:
        ValueError: not an object, a schema key whose value is not a string, or none of the accepted schemas.
    """
    if not isinstance(obj, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(obj).__name__}.")
    category = str(obj.get("category", "default"))
    if isinstance(obj.get("text"), str):
        return {"text": obj["text"]}
    if isinstance(obj.get("prompt"), str) and isinstance(obj.get("response"), str):
        return {"category": category, "prompt": obj["prompt"], "response": obj["response"]}
    if isinstance(obj.get("instruction"), str) and isinstance(obj.get("output"), str):
        extra = obj.get("input") or ""
        prompt = obj["instruction"] + (f"\n\n{extra}" if extra else "")
        return {"category": category, "prompt": prompt, "response": obj["output"]}
    wrong = [k for k in ("text", "prompt", "response", "instruction", "output") if k in obj]
    wrong = [k for k in wrong if not isinstance(obj[k], str)]
    if wrong:  # the keys are right; a value is of the wrong type (e.g. {"text": 5})
        shown = ", ".join(f"{k!r} is {type(obj[k]).__name__} {obj[k]!r}"[:120] for k in wrong)
        raise ValueError(f"{where}: {shown}; the value must be a string (quote it in the JSON).")
    raise ValueError(
        f"{where}: keys {sorted(obj)} match no schema; use {{'text'}}, {{'prompt', 'response'}} or "
        "{'instruction', 'output'} (optional 'input', 'category')."
    )


def read_jsonl(path: Path) -> list[dict[str, str]]:
    """Records of a JSONL file (blank lines skipped).

    Raises:
        ValueError: unreadable/empty file or a line that is not a valid record (with its line number).
    """
    records = []
    for lineno, line in enumerate(read_text_file(path).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}:{lineno} is not valid JSON ({exc.msg}).") from exc
        records.append(normalise_record(obj, f"{path}:{lineno}"))
    return records
