"""Where runs live: the ledger's root, fresh run folders, telling a run folder from any other folder.

The root is ``FineTuneConfig.runs_dir``, else ``$RUNLORA_NB_RUNS``, else ``<cache>/runs``. A run id is its
folder's name, ``<YYYYmmdd-HHMMSS>-<backend>-<8 hex>``.
"""

from __future__ import annotations

import os
import socket
import sys
import time
import uuid
from importlib import metadata
from pathlib import Path

from ..common.jsonfiles import read_json_dict
from ..common.paths import cache_dir, cache_root
from ..common.sysmem import pid_alive

__all__ = [
    "ACTIVE_RUNS",
    "STATUSES",
    "effective_status",
    "is_run_folder",
    "library_versions",
    "new_run_dir",
    "run_dir",
    "runs_root",
]

STATUSES = ("running", "finished", "stopped", "failed", "diverged", "interrupted")
_LIBRARIES = ("runlora_nb", "torch", "transformers", "peft", "numpy", "bitsandbytes", "safetensors")
#: Run ids being written by this process (a live kernel keeps its pid, so the pid alone cannot tell).
ACTIVE_RUNS: set[str] = set()


def runs_root(root: str | os.PathLike | None = None, create: bool = True) -> Path:
    """The ledger's root folder: ``root``, else ``$RUNLORA_NB_RUNS``, else ``<cache>/runs``.

    Args:
        root: the folder, or None for the defaults above.
        create: create it (to write a run); False for reading, so that a mistyped ``--runs-dir`` is not
            left behind as an empty folder.
    """
    if root is None and os.environ.get("RUNLORA_NB_RUNS"):
        root = os.environ["RUNLORA_NB_RUNS"]
    if root is None:
        return cache_dir("runs") if create else cache_root() / "runs"
    path = Path(root).expanduser()
    if create:
        path.mkdir(parents=True, exist_ok=True)
    return path


def new_run_dir(backend: str, root: str | os.PathLike | None = None) -> Path:
    """Create a fresh, unique run folder ``<root>/<YYYYmmdd-HHMMSS>-<backend>-<8 hex>``.

    Two runs started in the same second get different ids (random suffix), and the folder is created with
    ``exist_ok=False``, so a run never writes into another's folder.
    """
    base = runs_root(root)
    for _ in range(8):
        path = base / f"{time.strftime('%Y%m%d-%H%M%S')}-{backend}-{uuid.uuid4().hex[:8]}"
        try:
            path.mkdir(exist_ok=False)
            return path
        except FileExistsError:  # pragma: no cover - 32 random bits colliding
            continue
    raise RuntimeError(f"runs.new_run_dir: could not create a unique run folder under {base}")


def is_run_folder(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a folder the ledger wrote (not merely a folder with a ``config.json``).

    A model folder, a merged export or a project folder can hold a ``config.json`` too, so the file's
    presence proves nothing. The ledger's own marks are: a ``config.json`` whose ``id`` is the folder's name
    and whose ``config`` is a dict, or a ``status.json`` with a ledger status and a pid (this one survives a
    damaged ``config.json``).
    """
    path = Path(path)
    if not path.is_dir():
        return False
    info = read_json_dict(path / "config.json")
    if info.get("id") == path.absolute().name and isinstance(info.get("config"), dict):
        return True
    state = read_json_dict(path / "status.json")
    return state.get("status") in STATUSES and "pid" in state


def run_dir(run_id: str | os.PathLike, root: str | os.PathLike | None = None) -> Path:
    """The folder of run ``run_id`` (an id under the root, or a path to a run folder).

    Only folders the ledger wrote count (see :func:`is_run_folder`): everything that takes a run folder
    (``rm``, resume) may delete or rewrite it, so a model folder or ``.`` is never taken for a run.

    Raises:
        ValueError: no such run (the message lists where it looked), or the path is a folder that is not a
            ledger run.
    """
    given = Path(run_id)
    if is_run_folder(given):
        return given
    path = runs_root(root, create=False) / str(run_id)
    if is_run_folder(path):
        return path
    for found in (given, path):
        if not (found.is_dir() and ((found / "config.json").exists() or (found / "status.json").exists())):
            continue
        raise ValueError(
            f"runs: {found.absolute()} is not a run of the ledger (its config.json has no matching run id and "
            "it has no run status.json; a model folder or an export also holds a config.json); pass a run id "
            "from `runlora-nb runs list`"
        )
    raise ValueError(
        f"runs: no run {str(run_id)!r} under {runs_root(root, create=False)}; `runlora-nb runs list` shows the ids"
    )


def library_versions() -> dict[str, str | None]:
    """Python's and the recorded libraries' versions (None: not installed)."""
    out: dict[str, str | None] = {"python": sys.version.split()[0]}
    for name in _LIBRARIES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def effective_status(status: dict, run_id: str) -> str:
    """A run's status, with "running" turned into "interrupted" when its process on this machine is gone."""
    state = status.get("status", "interrupted")
    if state != "running":
        return state
    pid, host = status.get("pid"), status.get("host")
    if host not in (None, socket.gethostname()):
        return "running"  # another machine's run: cannot tell
    if pid == os.getpid():
        return "running" if run_id in ACTIVE_RUNS else "interrupted"
    return "running" if isinstance(pid, int) and pid_alive(pid) else "interrupted"
