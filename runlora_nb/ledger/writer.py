"""Writing the ledger: :class:`RunWriter` (one run folder's public writer) and :class:`RunLedger` (the engine's
callback that feeds it).

A run folder ``<root>/<run id>/`` holds:

- ``config.json``: the run's config, library versions and the chain plan of each layer;
- ``metrics.jsonl``: one JSON line per optimizer step (``kind: "step"``: train loss, lr, grad norm, tokens/s,
  step time, saved bytes, peak memory) and per evaluation (``kind: "eval"``: val loss, perplexity, accuracy);
- ``samples.jsonl``: generations before and after training;
- ``checkpoint/state.pt``: the latest resumable state (see :mod:`runlora_nb.train.checkpoint`);
- ``adapter/``: the final adapter in PEFT's format (unless the config names another ``output_dir``);
- ``status.json``: running / finished / stopped / failed / diverged, the pid, the message and the adapter path.

JSON files are written through a temporary file and ``os.replace``; metrics are appended one whole line per
write and a torn last line (a kill mid-write) is skipped on reading. The engine knows nothing about files:
:class:`RunLedger` receives its events, each carrying what it records.
"""

from __future__ import annotations

import json
import os
import socket
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from ..common.jsonfiles import finite_or_none, read_json_dict, write_json
from ..common.paths import atomic_write_text
from ..train.checkpoint import save_checkpoint
from ..train.config import FineTuneConfig
from ..train.events import Callback
from ..train.state import TrainState
from .folders import ACTIVE_RUNS, library_versions
from .reader import read_lines

__all__ = ["RunLedger", "RunWriter", "end_status"]


class RunWriter:
    """Writes one run folder (the engine's :class:`RunLedger` and the HF Trainer callback both use it).

    A folder deleted under a live run (``runs rm --force`` from another machine) stays deleted: the first write
    that finds it gone raises once, later writes do nothing (every write would otherwise recreate it, leaving
    a ghost run).

    Args:
        directory: the run folder (new, or an existing run's folder to resume).
    """

    def __init__(self, directory: str | os.PathLike) -> None:
        self.dir = Path(directory)
        self.id = self.dir.name
        self._status: dict[str, Any] = {}
        self._opened = False  # the folder exists from open() on; before that it may not yet
        self.removed = False

    def _present(self) -> bool:
        """Whether the folder is still there (see the class docstring).

        Raises:
            RuntimeError: the folder was removed (once; later calls return False and write nothing).
        """
        if self.removed:
            return False
        if self.dir.is_dir() or not self._opened:
            return True
        self.removed = True
        ACTIVE_RUNS.discard(self.id)
        raise RuntimeError(
            f"runs: the run folder {self.dir} was removed while run {self.id} was training; the run stops here "
            "and writes nothing more (start a new run to train again)"
        )

    def open(self, config: dict[str, Any], info: dict[str, Any] | None = None, *, resume_step: int | None = None,
             started: float | None = None) -> None:  # fmt: skip
        """Create the folder, write ``config.json`` and mark the run running (by this process).

        Args:
            config: the run's config as a dict.
            info: more ``config.json`` entries (parameter counts, rows).
            resume_step: when resuming, the checkpoint's step: metric lines after it are dropped (re-run).
            started: the start time to record (default: the one recorded, else now).
        """
        self.dir.mkdir(parents=True, exist_ok=True)
        self._opened = True
        ACTIVE_RUNS.add(self.id)
        old = read_json_dict(self.dir / "config.json")
        record = {
            "id": self.id,
            "config": config,
            "versions": library_versions(),
            "plans": old.get("plans", []),
        }
        write_json(self.dir / "config.json", {**record, **(info or {})})
        if resume_step is not None:
            self._truncate("metrics.jsonl", resume_step)
            self._status = read_json_dict(self.dir / "status.json")
        self.set_status(status="running", pid=os.getpid(), host=socket.gethostname(),
                        started=started or self._status.get("started", time.time()), resumed_from=resume_step,
                        message=None)  # fmt: skip

    def ensure_config(self, config: dict[str, Any]) -> None:
        """Write ``config.json`` when the run failed before :meth:`open` (it is still a listed, failed run)."""
        if not (self.dir / "config.json").exists():
            write_json(
                self.dir / "config.json", {"id": self.id, "config": config, "versions": library_versions()}
            )

    def _append(self, name: str, record: dict) -> None:
        if not self._present():
            return
        line = json.dumps({k: finite_or_none(v) for k, v in record.items()}) + "\n"
        with open(self.dir / name, "a", encoding="utf-8") as fh:
            fh.write(line)  # one write per line: a kill tears at most the last line, which readers skip
            fh.flush()

    def append_step(self, record: dict[str, Any]) -> None:
        """One step's metrics (``step``, ``train_loss``, ``lr``, …) as a ``kind: "step"`` line."""
        self._append("metrics.jsonl", {"kind": "step", **record})

    def append_eval(self, record: dict[str, Any]) -> None:
        """One evaluation (``step``, ``val_loss``, ``perplexity``, ``accuracy``) as a ``kind: "eval"`` line."""
        self._append("metrics.jsonl", {"kind": "eval", **record})

    def append_sample(self, record: dict[str, Any]) -> None:
        """One generation (``step``, ``stage``, ``prompt``, ``text``)."""
        self._append("samples.jsonl", record)

    def write_plans(self, rows: list[dict[str, Any]]) -> None:
        """The chain plan rows of the run's layers, into ``config.json``."""
        if not self._present():
            return
        cfg = read_json_dict(self.dir / "config.json")
        cfg["plans"] = list(rows)
        write_json(self.dir / "config.json", cfg)

    def write_checkpoint(self, state: TrainState) -> None:
        """The resumable state, atomically, and its step in the status."""
        if not self._present():
            return
        save_checkpoint(self.dir, state)
        self.set_status(checkpoint_step=state.step)

    def set_status(self, **fields: Any) -> None:
        """Update ``status.json`` (``updated`` is set to now)."""
        if not self._present():
            return
        self._status.update(fields, updated=time.time())
        write_json(self.dir / "status.json", self._status)

    def close(self, status: str, **fields: Any) -> None:
        """The final status (and ``ended``); this process no longer writes the run."""
        try:
            self.set_status(status=status, **fields, ended=time.time())
        finally:
            ACTIVE_RUNS.discard(self.id)

    def gone(self) -> bool:
        """True when the folder was removed under the open run (it must stay removed)."""
        if self.removed or (self._opened and not self.dir.is_dir()):
            self.removed = True
            ACTIVE_RUNS.discard(self.id)
        return self.removed

    def _truncate(self, name: str, step: int) -> None:
        path = self.dir / name
        if path.exists():
            keep = [r for r in read_lines(path) if r.get("step", 0) <= step]
            atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in keep))


def end_status(error: str | None, stopped: bool, diverged: bool) -> str:
    """diverged / interrupted (Ctrl-C) / failed / stopped / finished, from how a run ended."""
    if diverged:
        return "diverged"
    if error and error.startswith("KeyboardInterrupt"):
        return "interrupted"
    if error:
        return "failed"
    return "stopped" if stopped else "finished"


class RunLedger(Callback):
    """Engine callback that records a run into its folder (config, metrics, samples, checkpoints, status).

    Args:
        directory: the run folder (from :func:`~runlora_nb.ledger.folders.new_run_dir`, or a run's folder to
            resume).
        config: the run's config (recorded even when the run fails before it starts).
        resume_step: when resuming, the checkpoint's step: metric lines after it are dropped (they are re-run).
    """

    def __init__(
        self, directory: str | os.PathLike, config: FineTuneConfig, resume_step: int | None = None
    ) -> None:
        self.writer = RunWriter(directory)
        self.dir, self.id = self.writer.dir, self.writer.id
        self.config = config
        self.resume_step = resume_step

    def on_start(self, event) -> None:
        info = {"trainable_params": event.trainable_params, "total_params": event.total_params,
                "train_rows": event.train_rows, "val_rows": event.val_rows}  # fmt: skip
        self.writer.open(asdict(event.config), info, resume_step=self.resume_step)

    def on_step(self, event) -> None:
        record = asdict(event)
        record["train_loss"] = record.pop("loss")
        self.writer.append_step(record)

    def on_plans(self, event) -> None:
        self.writer.write_plans(list(event.plans))

    def on_eval(self, event) -> None:
        self.writer.append_eval(asdict(event))

    def on_sample(self, event) -> None:
        self.writer.append_sample(asdict(event))

    def on_checkpoint(self, event) -> None:
        self.writer.write_checkpoint(event.state)

    def on_end(self, event) -> None:
        if self.writer.gone():  # deleted under the run: stays deleted
            return
        self.writer.ensure_config(asdict(self.config))
        self.writer.close(end_status(event.error, event.stopped, event.diverged), step=event.step,
                          message=event.error, warnings=list(event.warnings), adapter_dir=event.adapter_dir,
                          elapsed_s=event.elapsed_s, val_loss=event.val_loss)  # fmt: skip
