"""LoRA X-ray state: the adapter's X-ray after each evaluation of a run, and of a finished run's saved adapter.

:class:`XrayHistory` keeps one :func:`~runlora_nb.measure.adapter_xray.adapter_xray` table per evaluation of a
run; the :class:`~runlora_nb.widgets.finetune.FineTuneController` records it from the model of the trainer it
created (events carry data only, so no callback reaches into a trainer). :func:`finished_run_xray` reads a
ledger run folder or an adapter folder, without the base model. No widget is imported here.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
from torch import nn

from runlora_nb.integrations.adapter_files import CONFIG_NAME, RUN_ADAPTER
from runlora_nb.ledger.reader import load_run
from runlora_nb.measure.adapter_xray import adapter_xray, saved_adapter_xray

__all__ = ["XrayHistory", "XraySnapshot", "finished_run_xray", "last_xray", "xray_summary"]


@dataclass(frozen=True)
class XraySnapshot:
    """The X-ray of a model at one step.

    Attributes:
        step: the optimizer step it was taken after (0: before training).
        table: :func:`~runlora_nb.measure.adapter_xray.adapter_xray`'s table.
    """

    step: int
    table: pd.DataFrame


class XrayHistory:
    """A run's X-rays, one per evaluation (thread-safe: written by the training thread, read by the panel)."""

    def __init__(self) -> None:
        self._snapshots: list[XraySnapshot] = []
        self._lock = threading.Lock()
        self.error: str | None = None

    def record(self, step: int, model: nn.Module) -> XraySnapshot | None:
        """X-ray ``model`` now and keep it as the snapshot of ``step``.

        Returns:
            The snapshot; None when the X-ray failed (the text is in ``error``): a teaching view must not stop
            the run it looks at.
        """
        try:
            snap = XraySnapshot(step, adapter_xray(model))
        except Exception as err:
            self.error = f"X-ray at step {step}: {type(err).__name__}: {err}"
            return None
        with self._lock:
            self._snapshots.append(snap)
        return snap

    @property
    def snapshots(self) -> list[XraySnapshot]:
        with self._lock:
            return list(self._snapshots)

    def latest(self) -> XraySnapshot | None:
        with self._lock:
            return self._snapshots[-1] if self._snapshots else None

    def frame(self) -> pd.DataFrame:
        """All snapshots stacked: step, module, norm, effective_rank, grad_A, grad_B (one row per module and step)."""
        cols = ["module", "norm", "effective_rank", "grad_A", "grad_B"]
        frames = [s.table[cols].assign(step=s.step) for s in self.snapshots]
        if not frames:
            return pd.DataFrame(columns=["step", *cols])
        return pd.concat(frames, ignore_index=True)[["step", *cols]]


def last_xray(runs: list) -> XraySnapshot | None:
    """The latest X-ray of the last run that has one (runs: :class:`~runlora_nb.widgets.finetune.RunTrace`)."""
    for run in reversed(runs):
        snap = run.xray.latest()
        if snap is not None:
            return snap
    return None


def finished_run_xray(folder: str | Path) -> pd.DataFrame:
    """The X-ray of a finished run, from its saved adapter (no base model loaded).

    Args:
        folder: a ledger run folder (its ``adapter/`` is read, and its recorded plans give the chain column),
            or an adapter folder (``adapter_config.json`` + ``adapter_model.safetensors``).

    Returns:
        :func:`~runlora_nb.measure.adapter_xray.saved_adapter_xray`'s table.

    Raises:
        AdapterError: no adapter is found there, or its files are malformed.
    """
    folder = Path(folder).expanduser()
    plans: dict[str, dict] = {}
    if not (folder / CONFIG_NAME).exists() and (folder / "status.json").exists():
        run = load_run(folder)
        plans = {p["module"]: p for p in run.info.get("plans", []) if isinstance(p, dict) and p.get("fwd")}
        saved = Path(run.adapter_dir) if run.adapter_dir else None
        folder = saved if saved is not None and saved.is_dir() else folder / RUN_ADAPTER
    return saved_adapter_xray(folder, plans)


def xray_summary(table: pd.DataFrame) -> pd.DataFrame:
    """The columns a teaching table shows, rounded: module, r, s, ‖sBA‖, σ₁, eff. rank, ‖∇A‖, ‖∇B‖, chain."""
    return pd.DataFrame(
        {
            "module": table["module"],
            "r": table["r"],
            "s": table["scaling"].round(4),
            "‖sBA‖": table["norm"].map(lambda v: f"{v:.3g}"),
            "σ₁": table["svals"].map(lambda sv: f"{sv[0]:.3g}" if len(sv) else ""),
            "eff. rank": table["effective_rank"].round(2),
            "‖∇A‖": table["grad_A"].map(lambda v: f"{v:.3g}"),
            "‖∇B‖": table["grad_B"].map(lambda v: f"{v:.3g}"),
            "chain": table["chain"],
        }
    )
