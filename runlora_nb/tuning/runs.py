"""The run ledger: every fine-tune is a folder under one root, readable after the kernel (or the process) is gone.

A run folder ``<root>/<run id>/`` holds:

- ``config.json``: the full :class:`FineTuneConfig`, library versions and the chain plan of each layer;
- ``metrics.jsonl``: one JSON line per optimizer step (``kind: "step"``: train loss, lr, grad norm, tokens/s,
  step time, saved bytes, peak memory) and per evaluation (``kind: "eval"``: val loss, perplexity, accuracy);
- ``samples.jsonl``: generations before and after training;
- ``checkpoint/state.pt``: the latest resumable state (see :mod:`.checkpoint`);
- ``adapter/``: the final adapter in PEFT's format (unless the config names another ``output_dir``);
- ``status.json``: running / finished / stopped / failed / diverged, the pid, the message and the adapter path.

JSON files are written through a temporary file and ``os.replace``; metrics are appended one whole line per
write and a torn last line (a kill mid-write) is skipped on reading. A run whose status says running but whose
process is gone is reported as ``interrupted``. :class:`RunLedger` is an ordinary callback of the engine: the
training loop knows nothing about files. The root is ``FineTuneConfig.runs_dir``, else ``$RUNLORA_NB_RUNS``,
else ``<cache>/runs``. Plotly figures are plain dict specs (no plotly import).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import sys
import time
import uuid
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import pandas as pd

from ..common.jsonfiles import finite_or_none, read_json_dict, write_json
from ..common.paths import atomic_write_text, cache_dir, cache_root
from ..common.sysmem import pid_alive as _pid_alive
from .config import FineTuneConfig
from .events import Callback

__all__ = [
    "STATUSES",
    "Run",
    "RunLedger",
    "check_not_running",
    "config_from_dict",
    "is_run_folder",
    "list_runs",
    "load_run",
    "new_run_dir",
    "remove_run",
    "run_dir",
    "runs_root",
    "saved_config",
]

STATUSES = ("running", "finished", "stopped", "failed", "diverged", "interrupted")
_LIBRARIES = ("runlora_nb", "torch", "transformers", "peft", "numpy", "bitsandbytes", "safetensors")
_ACTIVE: set[str] = set()  # run ids being written by this process (a live kernel keeps its pid)


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


def _versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {"python": sys.version.split()[0]}
    for name in _LIBRARIES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def config_from_dict(data: dict) -> FineTuneConfig:
    """A :class:`FineTuneConfig` from ``config.json``'s ``config`` entry (unknown keys are dropped)."""
    known = FineTuneConfig.__dataclass_fields__
    kwargs = {k: v for k, v in data.items() if k in known}
    for key in ("targets", "sample_prompts"):
        if isinstance(kwargs.get(key), list):
            kwargs[key] = tuple(kwargs[key])
    return FineTuneConfig(**kwargs)


def saved_config(run_id: str | os.PathLike, root: str | os.PathLike | None = None) -> FineTuneConfig:
    """The :class:`FineTuneConfig` a run was started with, read strictly from its ``config.json``.

    Readers of the ledger (list, show) tolerate a damaged file; resuming must not: an empty config means
    default settings, another model, and a run record rewritten with them.

    Raises:
        ValueError: ``config.json`` is missing, not JSON, or holds no ``config`` with a ``model``; the message
            names the file, what the checkpoint recorded, and the fix.
    """
    path = run_dir(run_id, root)
    file = path / "config.json"
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
        problem = None
    except FileNotFoundError:
        data, problem = None, "it is missing"
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        data, problem = None, f"it cannot be read ({type(err).__name__}: {err})"
    config = data.get("config") if isinstance(data, dict) else None
    if problem is None and not (isinstance(config, dict) and config.get("model")):
        problem = "it holds no run config with a model"
    if problem is None:
        return config_from_dict(config)
    recorded = ""
    try:
        from .checkpoint import load_checkpoint

        fields = load_checkpoint(path)["config"]
        recorded = "; the checkpoint recorded " + ", ".join(f"{k}={v!r}" for k, v in fields.items())
    except (ValueError, KeyError, TypeError):
        pass
    raise ValueError(
        f"runs: cannot resume run {path.name}: {file} is damaged ({problem}); nothing was written. Restore "
        "the file, or resume with the run's config given explicitly: FineTuner(FineTuneConfig(...), "
        f"resume={str(path)!r}){recorded}"
    )


def _effective_status(status: dict, run_id: str) -> str:
    state = status.get("status", "interrupted")
    if state != "running":
        return state
    pid, host = status.get("pid"), status.get("host")
    if host not in (None, socket.gethostname()):
        return "running"  # another machine's run: cannot tell
    if pid == os.getpid():
        return "running" if run_id in _ACTIVE else "interrupted"
    return "running" if isinstance(pid, int) and _pid_alive(pid) else "interrupted"


# ------------------------------------------------------------------------------------------------- writer


class RunLedger(Callback):
    """Engine callback that records a run into its folder (config, metrics, samples, status).

    Args:
        directory: the run folder (from :func:`new_run_dir`, or an existing run's folder to resume).
        resume_step: when resuming, the checkpoint's step: metric lines after it are dropped (they are re-run).
    """

    def __init__(self, directory: str | os.PathLike, resume_step: int | None = None) -> None:
        self.dir = Path(directory)
        self.id = self.dir.name
        self.resume_step = resume_step
        self._plans_written = False
        self._status: dict[str, Any] = {}
        self._opened = False  # the folder exists from on_start on; before that it may not yet
        self._removed = False

    # ---------------------------------------------------------------------------------- helpers
    def _present(self) -> bool:
        """Whether the run folder is still there; the first time it is found gone the run is stopped.

        A folder deleted under a live run (``runs rm --force`` from another machine) must stay deleted: every
        write below would recreate it (``atomic_write_text`` makes parent folders), leaving a ghost run.

        Raises:
            RuntimeError: the folder was removed (once; later calls return False and write nothing).
        """
        if self._removed:
            return False
        if self.dir.is_dir() or not self._opened:
            return True
        self._removed = True
        _ACTIVE.discard(self.id)
        raise RuntimeError(
            f"runs: the run folder {self.dir} was removed while run {self.id} was training; the run stops here "
            "and writes nothing more (start a new run to train again)"
        )

    def _append(self, name: str, record: dict) -> None:
        if not self._present():
            return
        line = json.dumps({k: finite_or_none(v) for k, v in record.items()}) + "\n"
        with open(self.dir / name, "a", encoding="utf-8") as fh:
            fh.write(line)  # one write per line: a kill tears at most the last line, which readers skip
            fh.flush()

    def _set_status(self, **fields: Any) -> None:
        if not self._present():
            return
        self._status.update(fields, updated=time.time())
        write_json(self.dir / "status.json", self._status)

    def _truncate(self, name: str, step: int) -> None:
        path = self.dir / name
        if path.exists():
            keep = [r for r in _read_lines(path) if r.get("step", 0) <= step]
            atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in keep))

    # ---------------------------------------------------------------------------------- events
    def on_start(self, trainer, event) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        self._opened = True
        _ACTIVE.add(self.id)
        old = read_json_dict(self.dir / "config.json")
        write_json(
            self.dir / "config.json",
            {
                "id": self.id,
                "config": asdict(event.config),
                "versions": _versions(),
                "plans": old.get("plans", []),
                "trainable_params": event.trainable_params,
                "total_params": event.total_params,
                "train_rows": event.train_rows,
                "val_rows": event.val_rows,
            },
        )
        if self.resume_step is not None:
            self._truncate("metrics.jsonl", self.resume_step)
            self._status = read_json_dict(self.dir / "status.json")
        self._set_status(
            status="running",
            pid=os.getpid(),
            host=socket.gethostname(),
            started=self._status.get("started", time.time()),
            resumed_from=self.resume_step,
            message=None,
        )

    def on_step(self, trainer, event) -> None:
        record = {"kind": "step", **asdict(event)}
        record["train_loss"] = record.pop("loss")
        self._append("metrics.jsonl", record)
        if not self._plans_written and not self._removed:  # plans exist once the first step ran every layer
            self._plans_written = True
            cfg = read_json_dict(self.dir / "config.json")
            plans = trainer.plans
            cfg["plans"] = json.loads(plans.to_json(orient="records")) if len(plans) else []
            write_json(self.dir / "config.json", cfg)

    def on_eval(self, trainer, event) -> None:
        self._append("metrics.jsonl", {"kind": "eval", **asdict(event)})

    def on_sample(self, trainer, event) -> None:
        self._append("samples.jsonl", {"step": trainer.step, **asdict(event)})

    def on_checkpoint(self, trainer, event) -> None:
        from .checkpoint import save_checkpoint

        if not self._present():
            return
        save_checkpoint(self.dir, trainer.state_dict())
        self._set_status(checkpoint_step=trainer.step)

    def on_end(self, trainer, event) -> None:
        if self._removed or (self._opened and not self.dir.is_dir()):  # deleted under the run: stays deleted
            self._removed = True
            _ACTIVE.discard(self.id)
            return
        if not (self.dir / "config.json").exists():  # failed before on_start: still a listed, failed run
            write_json(
                self.dir / "config.json",
                {"id": self.id, "config": asdict(trainer.config), "versions": _versions()},
            )
        if getattr(event, "diverged", False):
            state = "diverged"
        elif event.error and event.error.startswith("KeyboardInterrupt"):
            state = "interrupted"
        elif event.error:
            state = "failed"
        else:
            state = "stopped" if event.stopped else "finished"
        self._set_status(
            status=state,
            step=event.step,
            message=event.error,
            warnings=list(getattr(trainer.history, "warnings", [])),
            adapter_dir=event.adapter_dir,
            elapsed_s=event.elapsed_s,
            val_loss=event.val_loss,
            ended=time.time(),
        )
        _ACTIVE.discard(self.id)


# ------------------------------------------------------------------------------------------------- reader


def _read_lines(path: Path) -> list[dict]:
    out = []
    if not path.exists():
        return out
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:  # a line torn by a kill
            continue
    return out


@dataclass
class Run:
    """One run read back from its folder.

    Attributes:
        id: the folder name.
        path: the folder.
        status: running / finished / stopped / failed / diverged / interrupted.
        config: the FineTuneConfig as a dict.
        info: the rest of config.json (versions, plans, parameter counts).
        state: status.json as written.
        steps: per-step metrics (step, train_loss, lr, grad_norm, tokens_per_s, step_s, saved_bytes,
            peak_mem_bytes, …).
        evals: per-evaluation metrics (step, val_loss, perplexity, accuracy).
        samples: generations (stage, prompt, text, step).
    """

    id: str
    path: Path
    status: str
    config: dict
    info: dict
    state: dict
    steps: pd.DataFrame = field(repr=False)
    evals: pd.DataFrame = field(repr=False)
    samples: pd.DataFrame = field(repr=False)

    @property
    def adapter_dir(self) -> str | None:
        return self.state.get("adapter_dir")

    @property
    def checkpoint(self) -> Path | None:
        path = self.path / "checkpoint" / "state.pt"
        return path if path.exists() else None

    @property
    def plans(self) -> pd.DataFrame:
        return pd.DataFrame(self.info.get("plans", []))

    def fine_tune_config(self) -> FineTuneConfig:
        return config_from_dict(self.config)


def load_run(run_id: str | os.PathLike, root: str | os.PathLike | None = None) -> Run:
    """Read a run folder.

    Args:
        run_id: a run id under the root, or a run folder's path.
        root: the ledger root (default: see :func:`runs_root`).

    Returns:
        The :class:`Run`.

    Raises:
        ValueError: no such run.
    """
    path = run_dir(run_id, root)
    info = read_json_dict(path / "config.json")
    state = read_json_dict(path / "status.json")
    lines = _read_lines(path / "metrics.jsonl")
    steps = pd.DataFrame(
        [{k: v for k, v in r.items() if k != "kind"} for r in lines if r.get("kind") == "step"]
    )
    evals = pd.DataFrame(
        [{k: v for k, v in r.items() if k != "kind"} for r in lines if r.get("kind") == "eval"]
    )
    return Run(
        id=path.name,
        path=path,
        status=_effective_status(state, path.name),
        config=info.pop("config", {}),
        info=info,
        state=state,
        steps=steps,
        evals=evals,
        samples=pd.DataFrame(_read_lines(path / "samples.jsonl")),
    )


def _last(df: pd.DataFrame, col: str) -> float | None:
    return float(df[col].dropna().iloc[-1]) if col in df and df[col].notna().any() else None


def list_runs(root: str | os.PathLike | None = None) -> pd.DataFrame:
    """Every run under the root, newest first.

    Returns:
        One row per run: id, status, model, dataset, backend, r, alpha, lr, steps (configured), step
        (reached), train_loss (last), val_loss (last), started (UTC, to the second), path. Empty when the
        root does not exist (it is not created).
    """
    rows = []
    folder = runs_root(root, create=False)
    for path in sorted(folder.iterdir() if folder.is_dir() else (), reverse=True):
        if not is_run_folder(path):
            continue
        run = load_run(path)
        c = run.config
        rows.append(
            {
                "id": run.id,
                "status": run.status,
                "model": c.get("model"),
                "dataset": c.get("dataset"),
                "backend": c.get("backend"),
                "r": c.get("r"),
                "alpha": c.get("alpha"),
                "lr": c.get("lr"),
                "steps": c.get("steps"),
                "step": int(run.steps.step.max()) if len(run.steps) else 0,
                "train_loss": _last(run.steps, "train_loss"),
                "val_loss": _last(run.evals, "val_loss"),
                "started": _to_second(run.state.get("started")) if run.state else None,
                "path": str(run.path),
            }
        )
    columns = ["id", "status", "model", "dataset", "backend", "r", "alpha", "lr", "steps", "step",
               "train_loss", "val_loss", "started", "path"]  # fmt: skip
    return pd.DataFrame(rows, columns=columns)


def check_not_running(run_id: str | os.PathLike, root: str | os.PathLike | None = None) -> None:
    """Refuse to take over a run whose process is still writing its folder.

    Two processes writing one run folder interleave their metrics, checkpoints and status; so resuming a
    live run is refused. A run marked running on another machine cannot be checked from here and is refused
    too: the message says how to release it once that process is known to be gone.

    Raises:
        ValueError: the run is running (the message names the pid, the host and the fix).
    """
    run = load_run(run_id, root)
    if run.status != "running":
        return
    pid, host = run.state.get("pid"), run.state.get("host")
    if host in (None, socket.gethostname()):
        raise ValueError(
            f"runs: run {run.id} is still running (pid {pid} on this machine, writing {run.path}); a second "
            f"process would write the same folder. Wait for it to end or stop it (kill {pid}), then resume"
        )
    raise ValueError(
        f"runs: run {run.id} is marked running on {host} (pid {pid}), which this machine cannot check; if that "
        f'process is gone, set "status" to "interrupted" in {run.path / "status.json"}, then resume'
    )


def _to_second(started: float | None) -> pd.Timestamp | None:
    """A start time (epoch seconds) as a timestamp to the second: a table of runs has no use for nanoseconds."""
    return None if started is None else pd.to_datetime(started, unit="s").floor("s")


def remove_run(run_id: str, root: str | os.PathLike | None = None, force: bool = False) -> Path:
    """Delete a run folder.

    A run whose process is alive on this machine is never deleted, not even with ``force``: the process
    would go on writing (status, metrics, checkpoints, the adapter) and bring a half run back into the
    ledger. Stop it first. ``force`` is for a run marked running on another machine, which cannot be checked
    from here. Should its process still be alive, its :class:`RunLedger` notices the folder is gone and stops
    the run instead of recreating it.

    Raises:
        ValueError: no such run, a folder that is not a ledger run, a run alive on this machine, or a run
            marked running on another machine without ``force``.
    """
    run = load_run(run_id, root)
    if run.status == "running":
        pid, host = run.state.get("pid"), run.state.get("host")
        if host in (None, socket.gethostname()):
            raise ValueError(
                f"runs: run {run.id} is still running (pid {pid} on this machine); stop it first (Stop, Ctrl-C "
                f"or kill {pid}), then remove it. --force does not delete a live run: its process would go on "
                f"writing into {run.path} and bring the run back"
            )
        if not force:
            raise ValueError(
                f"runs: run {run.id} is marked running on {host} (pid {pid}), which this machine cannot check; "
                "if that process is gone, pass --force (force=True) to delete it"
            )
    shutil.rmtree(run.path)
    return run.path
