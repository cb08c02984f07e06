"""The dashboard: the four panels in tabs, sharing one model picker."""

from __future__ import annotations

from typing import Any

import ipywidgets as widgets

from ._util import close_tree
from .finetune import FineTuneController
from .finetune_view import FineTunePanel
from .lab_view import LoRALab
from .picker import PickerController
from .picker_view import ModelPicker
from .race import RaceController
from .race_view import ChainRace

__all__ = ["TAB_TITLES", "Dashboard", "dashboard"]

TAB_TITLES = ("Model", "Chain race", "LoRA lab", "Fine-tune")


class Dashboard(widgets.VBox):
    """Model picker, chain race, LoRA lab and fine-tuning in tabs; the race (model mode) and the fine-tune
    panel use the picker's choice.

    Attributes:
        picker: the :class:`ModelPicker` (its ``controller`` is the shared state).
        race: the :class:`ChainRace`.
        lab: the :class:`LoRALab`.
        finetune: the :class:`FineTunePanel`.
        tabs: the ``ipywidgets.Tab``.
        panels: the four panels, in tab order.
    """

    def __init__(
        self,
        model: str | None = None,
        *,
        autoload: bool = True,
        race: dict[str, Any] | None = None,
        finetune: dict[str, Any] | None = None,
    ) -> None:
        picker = PickerController(model)
        self.picker = ModelPicker(picker, autoload=autoload)
        self.race = ChainRace(RaceController(picker, **(race or {})))
        self.lab = LoRALab()
        self.finetune = FineTunePanel(FineTuneController(picker, **(finetune or {})))
        self.panels = (self.picker, self.race, self.lab, self.finetune)
        self.tabs = widgets.Tab(children=list(self.panels), titles=TAB_TITLES)
        self.closed = False
        super().__init__([self.tabs])

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
) -> Dashboard:
    """The runlora_nb dashboard: pick a model, race the chains, explore the arithmetic, fine-tune.

    Args:
        model: the picker's model (default: ``smollm2-135m`` when cached, else ``tiny-llama``).
        autoload: load the model in a background thread right away (the widget shows at once).
        race: initial :class:`~runlora_nb.widgets.race.RaceSettings` fields (e.g. ``{"tokens": 256}``).
        finetune: initial :class:`~runlora_nb.widgets.finetune.FineTuneSettings` fields (e.g. ``{"steps": 20}``).

    Returns:
        The :class:`Dashboard` widget (display it; ``close()`` releases everything).

    Example:
        >>> from runlora_nb.widgets import dashboard
        >>> dash = dashboard()
        >>> dash  # in a notebook cell
    """
    return Dashboard(model, autoload=autoload, race=race, finetune=finetune)
