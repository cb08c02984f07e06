"""Where runlora_nb keeps its caches (plans, calibrations, converted models, datasets).

The root is ``$RUNLORA_NB_CACHE`` when set, else the platform's user cache dir (``~/.cache/runlora_nb`` on
Linux). Every writer in the package goes through :func:`atomic_write_bytes` / :func:`atomic_dir` so that an
interrupted write never leaves a half-written file or folder behind.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import platformdirs

__all__ = ["atomic_dir", "atomic_write_bytes", "atomic_write_text", "cache_dir", "cache_root"]


def cache_root() -> Path:
    """The cache root: ``$RUNLORA_NB_CACHE`` when set, else the platform's user cache dir (not created)."""
    return Path(os.environ.get("RUNLORA_NB_CACHE") or platformdirs.user_cache_dir("runlora_nb"))


def cache_dir(*parts: str) -> Path:
    """Return (and create) a folder under the runlora_nb cache root.

    Args:
        *parts: sub-folders below the root, e.g. ``cache_dir("models", "smollm2-135m")``.

    Returns:
        The folder's path; it exists on return.
    """
    path = Path(cache_root(), *parts)
    path.mkdir(parents=True, exist_ok=True)
    return path


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` through a temporary file in the same folder and an atomic rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.chmod(tmp, 0o644)  # mkstemp makes 0600 files; these are ordinary user files
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Text version of :func:`atomic_write_bytes` (UTF-8)."""
    return atomic_write_bytes(path, text.encode("utf-8"))


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Build a folder in a temporary sibling and move it to ``path`` only if the block succeeds.

    An existing ``path`` is replaced. On error the temporary folder is removed and ``path`` is untouched.

    Yields:
        The temporary folder to fill.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    tmp.chmod(0o755)  # mkdtemp makes 0700 folders; a cached model folder is an ordinary folder
    try:
        yield tmp
        if path.exists():
            old = path.with_name(f".{path.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
