"""Integrity of cached model folders: a sha256 manifest, its verification, file modes and stale temp folders.

:func:`write_manifest` records size and sha256 of every file of a freshly fetched folder in its marker
(``runlora_nb.json``) and makes the files world-readable (``0644`` under the usual umask). :func:`verify` checks
them on load; a file's hash is recomputed only when its size or mtime changed since it was last verified
(remembered in memory and in ``.verified.json`` next to the files). :func:`clean_stale` removes temporary
folders that a killed fetch left behind.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import socket
import time
from pathlib import Path

from ..common.paths import atomic_write_text
from ..common.sysmem import pid_alive as _pid_alive

__all__ = ["MARKER", "OWNER", "clean_stale", "file_manifest", "verify", "write_manifest", "write_owner"]

MARKER = "runlora_nb.json"  # written last inside a cached model folder: its presence means "complete"
OWNER = ".owner.json"  # inside a temporary fetch folder: which process builds it, since when
_STAMP = ".verified.json"
_SKIP = {MARKER, OWNER, _STAMP}
_verified: dict[tuple[str, int, int], str] = {}  # (path, size, mtime_ns) -> sha256, this process


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def _files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.name not in _SKIP)


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def file_manifest(folder: Path) -> dict[str, dict[str, object]]:
    """``{relative path: {"size": bytes, "sha256": hex}}`` of every file below ``folder`` (marker excluded)."""
    return {
        p.relative_to(folder).as_posix(): {"size": p.stat().st_size, "sha256": _sha256(p)}
        for p in _files(folder)
    }


def write_manifest(folder: Path, marker: dict[str, object]) -> None:
    """Make the files readable (``0o666 & ~umask``, folders ``0o777 & ~umask``), then write the marker with
    the manifest (last, so its presence still means "complete")."""
    mask = _umask()
    for path in folder.rglob("*"):
        path.chmod((0o777 if path.is_dir() else 0o666) & ~mask)
    atomic_write_text(
        folder / MARKER, json.dumps({**marker, "files": file_manifest(folder)}, indent=2) + "\n"
    )
    (folder / MARKER).chmod(0o666 & ~mask)


def _read_stamp(folder: Path) -> dict[str, list]:
    try:
        data = json.loads((folder / _STAMP).read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def verify(folder: Path) -> str | None:
    """What is wrong with a cached model folder, or None when every file matches its manifest.

    A folder fetched before manifests existed (no ``files`` in its marker) gets one now (trust on first use).

    Args:
        folder: a cached model folder with a marker.

    Returns:
        A sentence naming the first bad file (missing, wrong size, or wrong sha256), or None.
    """
    try:
        marker = json.loads((folder / MARKER).read_text())
    except (OSError, ValueError) as exc:
        return f"its marker {MARKER} is unreadable ({exc})"
    files = marker.get("files") if isinstance(marker, dict) else None
    if not isinstance(files, dict):
        with contextlib.suppress(OSError):
            write_manifest(folder, marker if isinstance(marker, dict) else {})
        return None
    stamp, changed = _read_stamp(folder), False
    for rel, info in files.items():
        path = folder / rel
        try:
            st = path.stat()
        except OSError:
            return f"{rel} is missing"
        if not isinstance(info, dict) or st.st_size != info.get("size"):
            return (
                f"{rel} is {st.st_size} bytes, {info.get('size') if isinstance(info, dict) else '?'} expected"
            )
        key = (str(path), st.st_size, st.st_mtime_ns)
        known = _verified.get(key)
        if known is None and stamp.get(rel) == [st.st_size, st.st_mtime_ns, info.get("sha256")]:
            known = info.get("sha256")
        if known is None:
            known, changed = _sha256(path), True
        if known != info.get("sha256"):
            return f"{rel} does not match the sha256 recorded when it was fetched (its content is corrupt)"
        _verified[key] = known
        stamp[rel] = [st.st_size, st.st_mtime_ns, known]
    if changed:
        with contextlib.suppress(OSError):  # a read-only cache only costs hashing again next time
            atomic_write_text(folder / _STAMP, json.dumps(stamp))
    return None


def write_owner(tmp: Path) -> None:
    """Record which process builds the temporary folder ``tmp`` (read by :func:`clean_stale`)."""
    info = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time()}
    (tmp / OWNER).write_text(json.dumps(info))


def clean_stale(root: Path, max_age_s: float = 3600.0) -> list[Path]:
    """Remove temporary fetch folders (``.NAME.*.tmp``, ``.NAME.old``) below ``root`` that nobody builds.

    A folder is stale when the process recorded in its owner file is dead (same host), or when it is older
    than ``max_age_s`` (by its owner file's start time, else its mtime).

    Args:
        root: the models folder.
        max_age_s: age after which any temporary folder is stale.

    Returns:
        The folders removed.
    """
    removed = []
    now = time.time()
    for path in root.glob(".*"):
        if not path.is_dir() or not (path.name.endswith(".tmp") or path.name.endswith(".old")):
            continue
        try:
            owner = json.loads((path / OWNER).read_text())
        except (OSError, ValueError):
            owner = None
        try:
            started = float(owner["started"]) if isinstance(owner, dict) else path.stat().st_mtime
            dead = (
                isinstance(owner, dict)
                and owner.get("host") == socket.gethostname()
                and not _pid_alive(int(owner["pid"]))
            )
        except (OSError, KeyError, TypeError, ValueError):
            started, dead = 0.0, False
        if dead or now - started > max_age_s:
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed
