"""Where sweeps live: the optuna storage (a SQLite file by default), opening a study safely from several
processes, and the recovery of trials whose process died.

A storage file is checked to be SQLite before optuna touches it; creating a new storage or study is serialised
by a lock file beside it (two sweeps creating one file at once raced on CREATE TABLE); a RUNNING trial whose
process is gone is marked failed and its parameters are queued again.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import warnings
from pathlib import Path
from typing import Any

from ..common.paths import cache_dir
from ..common.sysmem import pid_alive
from .space import SearchSpace

__all__ = ["open_study", "storage_url"]

_SPACE_ATTR, _SETUP_ATTR = "runlora_space", "runlora_setup"
_LIVE: set[int] = set()  # optuna trial ids this process is running
_SQLITE_MAGIC = b"SQLite format 3\x00"  # the first 16 bytes of every SQLite database file


def _optuna():
    import optuna  # loaded on a sweep's first use: importing it costs seconds and most runs never sweep

    return optuna


def storage_url(storage: str | os.PathLike | None = None) -> str:
    """The SQLite URL of a sweep storage, after checking it can be written.

    Args:
        storage: a file path, a ``sqlite:///...`` (or other SQLAlchemy) URL, or None for
            ``<cache>/sweeps/sweeps.db``.

    Returns:
        The URL.

    Raises:
        ValueError: the file (or its folder) cannot be created or written, or it is a file that is not a
            SQLite database.
    """
    if storage is not None and "://" in str(storage):
        url = str(storage)
        if not url.startswith("sqlite:///"):
            return url
        path = Path(url[len("sqlite:///") :])
    else:
        path = Path(storage).expanduser() if storage is not None else cache_dir("sweeps") / "sweeps.db"
    path = path.resolve()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "ab"):  # an empty file is an empty SQLite database
            pass
        if not os.access(path, os.W_OK):
            raise PermissionError("not writable")
    except OSError as err:
        raise ValueError(
            f"sweep: the storage {str(path)!r} is not writable ({type(err).__name__}: {err}); give a file in a "
            f"writable folder (storage=... / --storage PATH)"
        ) from None
    with open(path, "rb") as fh:
        head = fh.read(len(_SQLITE_MAGIC))
    if head and head != _SQLITE_MAGIC:  # SQLAlchemy would fail later with "file is not a database"
        raise ValueError(
            f"sweep: the storage {str(path)!r} is not a SQLite database (it starts with {head!r}); give the "
            "sweep's database file, or a new file name such as sweeps.db (storage=... / --storage PATH)"
        )
    return f"sqlite:///{path}"


@contextlib.contextmanager
def _creating(url: str):
    """Serialise the first use of a SQLite storage across threads and processes.

    Creating the storage makes its tables and version rows; two sweeps doing it at once on a new file both
    run ``CREATE TABLE`` / insert the version row, and one fails ("table ... already exists", a UNIQUE
    constraint). A lock file next to the database makes the second one wait and then find the tables made.
    """
    if not url.startswith("sqlite:///"):
        yield  # a server database handles concurrent DDL itself
        return
    from filelock import FileLock

    with FileLock(url[len("sqlite:///") :] + ".lock", timeout=300):
        yield


def _rdb_storage(url: str):
    """An ``optuna.storages.RDBStorage`` for ``url``, its tables created under :func:`_creating`."""
    optuna = _optuna()
    with _creating(url), warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return optuna.storages.RDBStorage(
            url, heartbeat_interval=60, grace_period=300, heartbeat_stale_trial_callback=_requeue
        )


def _trial_is_dead(trial) -> bool:
    pid, host = trial.user_attrs.get("pid"), trial.user_attrs.get("host")
    if not isinstance(pid, int) or host != socket.gethostname():
        return False  # another machine's trial (optuna's heartbeat covers it) or not started yet
    if pid == os.getpid():
        return trial._trial_id not in _LIVE
    return not pid_alive(pid)


def _requeue(study, trial) -> None:
    """Queue an interrupted trial's parameters again (the heartbeat callback, and at resume)."""
    if trial.params:
        study.enqueue_trial(dict(trial.params), user_attrs={"retry_of": trial.number})


def _recover(study) -> list[int]:
    """Mark RUNNING trials of dead processes on this host FAIL (outcome interrupted) and re-queue them."""
    optuna = _optuna()
    failed = []
    for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        if not _trial_is_dead(t):
            continue
        storage, queued = study._storage, t.user_attrs.get("outcome") in ("stopped", "interrupted")
        with contextlib.suppress(optuna.exceptions.UpdateFinishedTrialError):
            if not queued:  # a Stop or Ctrl-C already queued it again before the process died
                storage.set_trial_user_attr(t._trial_id, "outcome", "interrupted")
            if storage.set_trial_state_values(t._trial_id, state=optuna.trial.TrialState.FAIL):
                if not queued:
                    _requeue(study, t)
                failed.append(t.number)
    return failed


def open_study(
    study_name: str,
    storage: str | os.PathLike | None = None,
    space: SearchSpace | None = None,
    setup: dict[str, Any] | None = None,
    sampler: Any = None,
    pruner: Any = None,
):
    """Create or load an optuna study that holds a sweep, checking it is the same sweep.

    Args:
        study_name: the study's name in the storage.
        storage: see :func:`storage_url`.
        space: the search space (stored on creation, compared on load); None: do not check.
        setup: the fixed settings (model, dataset, steps, sampler, base config) stored and compared like the
            space.
        sampler: an optuna sampler; pruner: an optuna pruner.

    Returns:
        The ``optuna.Study``.

    Raises:
        ValueError: an unwritable storage, a file that is not a database, or the study was created with
            another space or setup.
    """
    optuna = _optuna()
    if not study_name or not isinstance(study_name, str):
        raise ValueError(f"sweep: study_name must be a non-empty string, got {study_name!r}")
    url = storage_url(storage)
    rdb = _rdb_storage(url)
    with _creating(url):  # two sweeps creating one new study: the second loads the first's
        study = optuna.create_study(
            study_name=study_name,
            storage=rdb,
            load_if_exists=True,
            direction="minimize",
            sampler=sampler,
            pruner=pruner,
        )
    attrs = study.user_attrs
    for key, want in ((_SPACE_ATTR, space.describe() if space else None), (_SETUP_ATTR, setup)):
        if want is None:
            continue
        want = json.loads(json.dumps(want, default=str))
        if key not in attrs:
            if study.trials and key == _SPACE_ATTR:
                raise ValueError(f"sweep: study {study_name!r} in {url} was not made by run_sweep")
            study.set_user_attr(key, want)
        elif attrs[key] != want:
            diff = sorted(k for k in {*want, *attrs[key]} if want.get(k) != attrs[key].get(k))
            what = "search space" if key == _SPACE_ATTR else "setup"
            details = "; ".join(f"{k}: stored {attrs[key].get(k)!r}, now {want.get(k)!r}" for k in diff)
            raise ValueError(
                f"sweep: study {study_name!r} in {url} was created with another {what} ({details}); "
                f"resume it with the same arguments or give a new study name"
            )
    return study
