"""Where an export may write, and what it says when it cannot: the checks made before any work is done.

An export replaces its destination as a whole, so :func:`check_destination` refuses a folder that is not an
earlier export of ours (its :data:`MANIFEST` lists what it wrote) and :func:`check_file_destination` refuses
to overwrite a ``.gguf`` file's sidecars, unless forced. Also here: the file modes an export is given (those
of a plain write under the umask) and the full-disk message naming the bytes the weights need. Building the
artefacts is :mod:`runlora_nb.assess.export`.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
from pathlib import Path
from typing import Any

from torch import nn

from .parity import PARITY_FILE

__all__ = ["MANIFEST", "check_destination", "check_file_destination", "gguf_file_layout"]

MANIFEST = "runlora_export.json"  # marks a folder as an export of ours and lists what it wrote


def _export_manifest(folder: Path) -> dict[str, Any] | None:
    """The manifest an earlier export wrote into ``folder``, or None (absent, unreadable, not ours)."""
    try:
        data = json.loads((folder / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    if (
        not isinstance(data, dict)
        or data.get("tool") != "runlora_nb"
        or not isinstance(data.get("files"), list)
    ):
        return None
    return data


def check_destination(out: str | os.PathLike, force: bool = False) -> Path:
    """Fail early, before any work, when ``out`` cannot become a folder or holds something not ours.

    An export replaces ``out`` as a whole. That is safe for an earlier export of ours (its ``MANIFEST``
    lists everything it wrote) but would silently delete anything else: a non-empty folder without the
    manifest, or one holding entries the manifest does not list (notes added later), is refused unless
    ``force``.

    Raises:
        ValueError: ``out`` is an existing file, an ancestor is a file, the nearest existing ancestor is not
            writable, or ``out`` is a non-empty folder that is not an earlier export (without ``force``).
    """
    out = Path(out).expanduser().absolute()
    if out.exists() and not out.is_dir():
        raise ValueError(f"export: {out} exists and is not a folder; pass a folder path for --out")
    if out.is_dir() and not force:
        entries = sorted(p.name for p in out.iterdir())
        manifest = _export_manifest(out)
        foreign = [n for n in entries if manifest is None or n not in {*manifest["files"], MANIFEST}]
        if entries and foreign:
            why = (
                "it is not an earlier export (no " + MANIFEST + ")"
                if manifest is None
                else "it holds entries the earlier export did not write"
            )
            shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
            raise ValueError(
                f"export: {out} is not empty and {why}: {shown}; exporting would replace the whole folder. "
                "Choose a new or empty folder for --out, or pass --force (force=True) to replace it"
            )
    _check_writable_parent(out)
    return out


def _check_writable_parent(out: Path) -> None:
    """Refuse ``out`` when its nearest existing ancestor is a file or denies writing."""
    parent = out.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise ValueError(f"export: cannot create {out}: {parent} is a file, not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ValueError(
            f"export: destination {out} is not writable ({parent} denies writing); choose another --out"
        )


def gguf_file_layout(out: str | os.PathLike, fmt: str) -> bool:
    """Whether a ``fmt`` export to ``out`` writes the file ``out`` (a GGUF path ending in ``.gguf`` that is not
    an existing folder, such as one an earlier version of this exporter made) rather than a folder."""
    path = Path(out).expanduser()
    return fmt == "gguf" and path.suffix.lower() == ".gguf" and not path.is_dir()


def _sidecars(out: Path) -> list[Path]:
    """The files a ``.gguf`` file export writes: the Modelfile and parity report first, the GGUF last."""
    return [out.with_suffix(".Modelfile"), out.with_name(f"{out.stem}.{PARITY_FILE}"), out]


def check_file_destination(out: str | os.PathLike, force: bool = False) -> Path:
    """Fail early, before any work, when the ``.gguf`` file ``out`` or its sidecars cannot be written.

    Raises:
        ValueError: ``out``, ``x.Modelfile`` or ``x.parity.json`` already exists (without ``force``) or is a
            folder, an ancestor is a file, or the nearest existing ancestor is not writable.
    """
    out = Path(out).expanduser().absolute()
    for path in _sidecars(out):
        if path.is_dir():
            raise ValueError(f"export: {path} is a folder; choose another --out file name")
    existing = [p.name for p in _sidecars(out) if p.exists()]
    if existing and not force:
        raise ValueError(
            f"export: {', '.join(existing)} already exist(s) in {out.parent}; choose another --out file name, "
            "or pass --force (force=True) to replace them"
        )
    _check_writable_parent(out)
    return out


def _check_out(out: str | os.PathLike, fmt: str, force: bool) -> Path:
    if gguf_file_layout(out, fmt):
        return check_file_destination(out, force)
    return check_destination(out, force)


def _umask() -> int:
    # os.umask is the only way to read it: set it and put it straight back
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _default_modes(folder: Path) -> None:
    """Give ``folder`` and everything in it the modes a plain write would (``0o666 & ~umask``, folders
    ``0o777 & ~umask``).

    Some writers (transformers' safetensors save, ``tempfile``-based atomic writes, ``mkdtemp``) leave 0600
    files or 0700 folders; an export is meant to be shared or served like any other file the user makes.
    """
    mask = _umask()
    for path in [folder, *folder.rglob("*")]:
        if not path.is_symlink():
            path.chmod((0o777 if path.is_dir() else 0o666) & ~mask)


def _no_space(err: BaseException) -> bool:
    """Whether ``err`` (or what caused it) is a full disk or an exhausted quota.

    safetensors reports a full disk as ``SafetensorError("... No space left on device (os error 28)")``, not
    as an OSError, so the message is checked too.
    """
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        text = str(err)
        if "No space left on device" in text or "os error 28" in text or "Disk quota exceeded" in text:
            return True
        err = err.__cause__ or err.__context__
    return False


def _export_bytes(model: nn.Module, fmt: str, dtype: str) -> int:
    """About how many bytes the export's weights take (tied tensors counted once; tokenizer etc. left out)."""
    seen, lora, base = set(), 0, 0
    size = {"f32": 4, "f16": 2, "bf16": 2}[dtype] if fmt == "gguf" else None
    for name, p in model.named_parameters(remove_duplicate=False):
        if p.data_ptr() in seen:
            continue
        seen.add(p.data_ptr())
        n = p.numel() * (size or p.element_size())
        if "lora_" in name:
            lora += n
        else:
            base += n
    return lora if fmt == "peft" else base


def _mib(n: int) -> str:
    return f"{n / 2**20:,.1f} MiB"


def _no_space_error(out: Path, needed: int, had_export: bool) -> ValueError:
    where = out.parent
    while not where.exists():
        where = where.parent
    try:
        free = f", {_mib(shutil.disk_usage(where).free)} free there"
    except OSError:
        free = ""
    kept = "; the previous export there is kept" if had_export else ""
    return ValueError(
        f"export: not enough disk space to write {out} (the weights alone need about {_mib(needed)} "
        f"= {needed:,} bytes{free}); nothing was written{kept}. Free some space, or choose another --out "
        "on a disk with room"
    )
