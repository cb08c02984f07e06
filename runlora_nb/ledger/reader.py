"""Reading the ledger: one run back from its folder (:class:`Run`), every run as a table, and removing a run.

Readers tolerate what a kill leaves (a torn last metrics line, a missing status); :func:`saved_config`, used to
resume, does not: resuming with a damaged config would train another model over the run's record.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from ..common.jsonfiles import read_json_dict
from ..train.checkpoint import load_checkpoint
from ..train.config import FineTuneConfig
from ..train.history import History
from .folders import effective_status, is_run_folder, run_dir, runs_root

__all__ = [
    "Run",
    "check_not_running",
    "config_from_dict",
    "list_runs",
    "load_run",
    "read_lines",
    "remove_run",
    "saved_config",
]


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
        fields = load_checkpoint(path).config
        recorded = "; the checkpoint recorded " + ", ".join(f"{k}={v!r}" for k, v in fields.items())
    except (ValueError, KeyError, TypeError):
        pass
    raise ValueError(
        f"runs: cannot resume run {path.name}: {file} is damaged ({problem}); nothing was written. Restore "
        "the file, or resume with the run's config given explicitly: runlora_nb.ledger.resume_tuner("
        f"{str(path)!r}, config=FineTuneConfig(...)){recorded}"
    )


def read_lines(path: Path) -> list[dict]:
    """The JSON lines of ``path`` (none when it is missing); a line torn by a kill is skipped."""
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

    def history(self) -> History:
        """The run as a :class:`~runlora_nb.train.History` (the same tables and metrics as a live run's)."""
        steps = self.steps.astype(object).where(self.steps.notna(), None).to_dict("records")
        evals = self.evals.astype(object).where(self.evals.notna(), None).to_dict("records")
        return History.from_records(steps, evals, self.samples.to_dict("records"))


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
    lines = read_lines(path / "metrics.jsonl")
    steps = pd.DataFrame(
        [{k: v for k, v in r.items() if k != "kind"} for r in lines if r.get("kind") == "step"]
    )
    evals = pd.DataFrame(
        [{k: v for k, v in r.items() if k != "kind"} for r in lines if r.get("kind") == "eval"]
    )
    return Run(
        id=path.name,
        path=path,
        status=effective_status(state, path.name),
        config=info.pop("config", {}),
        info=info,
        state=state,
        steps=steps,
        evals=evals,
        samples=pd.DataFrame(read_lines(path / "samples.jsonl")),
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
