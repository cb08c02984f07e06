"""RunsController: the state behind the Runs tab (no widgets): the ledger's runs, a selection, the comparison.

Drives :mod:`runlora_nb.ledger` (``list_runs``, ``load_run``, ``compare``); tests use it without a browser.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import pandas as pd

from runlora_nb.ledger import list_runs, load_run, runs_root
from runlora_nb.ledger.run_compare import Comparison, compare

from .tasks import Listeners

__all__ = ["RunsController", "run_label"]


def run_label(row: pd.Series) -> str:
    """One line for a run in a picker: id · status · model · r · lr · last val loss."""
    val = row.get("val_loss")
    loss = f"val {val:.4f}" if isinstance(val, float) and val == val else "no eval"
    return (
        f"{row['id']} · {row['status']} · {row.get('model')} · r={row.get('r')} · lr={row.get('lr')} · {loss}"
    )


@dataclass
class SideBySide:
    """Samples of the selected runs: one row per (stage, prompt), one column per run."""

    table: pd.DataFrame


class RunsController:
    """The ledger's runs and the ones picked for comparison.

    Events (``subscribe(fn)``, ``fn(kind, payload)``): ``"runs"`` (the list was refreshed, a DataFrame) and
    ``"selection"`` (the picked ids, a tuple).

    Args:
        root: the ledger root (default: ``$RUNLORA_NB_RUNS``, else the cache's ``runs/``).
    """

    def __init__(self, root: str | os.PathLike | None = None) -> None:
        self.root = root
        self.listeners = Listeners()
        self.runs = pd.DataFrame()
        self.selected: tuple[str, ...] = ()

    def subscribe(self, fn) -> Any:
        return self.listeners.subscribe(fn)

    @property
    def where(self) -> str:
        return str(runs_root(self.root))

    def refresh(self) -> pd.DataFrame:
        """Re-read the ledger; drops selected ids that no longer exist. Returns the run table."""
        self.runs = list_runs(self.root)
        known = set(self.runs["id"]) if len(self.runs) else set()
        self.selected = tuple(i for i in self.selected if i in known)
        self.listeners.notify("runs", self.runs)
        return self.runs

    def select(self, ids: list[str] | tuple[str, ...]) -> tuple[str, ...]:
        """Pick runs to compare.

        Raises:
            ValueError: an id that is not in the ledger (refresh first).
        """
        known = set(self.runs["id"]) if len(self.runs) else set()
        unknown = [i for i in ids if i not in known]
        if unknown:
            raise ValueError(
                f"runs: no run {unknown[0]!r} under {self.where}; refresh the list (`runlora-nb runs list`)"
            )
        self.selected = tuple(ids)
        self.listeners.notify("selection", self.selected)
        return self.selected

    def comparison(self) -> Comparison | None:
        """The selected runs side by side (None when nothing is selected)."""
        return compare(list(self.selected), self.root) if self.selected else None

    def samples(self) -> SideBySide:
        """The generations of the selected runs, side by side."""
        rows: dict[tuple[str, str], dict[str, str]] = {}
        for run_id in self.selected:
            s = load_run(run_id, self.root).samples
            for _, r in s.iterrows() if len(s) else ():
                rows.setdefault((r.get("stage"), r.get("prompt")), {})[run_id] = r.get("text")
        table = pd.DataFrame(
            [{"stage": st, "prompt": p, **texts} for (st, p), texts in rows.items()],
            columns=["stage", "prompt", *self.selected],
        )
        return SideBySide(table)

    def adapter_dir(self, run_id: str) -> str | None:
        """Where a run saved its adapter (None if it did not finish saving)."""
        return load_run(run_id, self.root).adapter_dir
