"""JupyterLab panels for runlora_nb (installed as ``runlora_nb.widgets``; the core never imports it).

The top layer: it may import every layer of the core (``runlora_nb.*``), ipywidgets and plotly (views only).

Each panel is a thin ipywidgets + plotly ``FigureWidget`` view over a controller that holds the state and calls
the core; controllers import no widget, so scripts and tests drive them directly.

* :class:`ModelPicker` / :class:`PickerController`: model, LoRA setting, parameter counts, memory estimate.
* :class:`ChainRace` / :class:`RaceController`: race every chain pair, the planner, PEFT and the frozen floor.
* :class:`LoRALab` / :class:`LabController`: FLOPs per pair, the winner over (N, r), saved tensors.
* :class:`FineTunePanel` / :class:`FineTuneController`: train with live curves, Stop, PEFT overlay.
* :class:`RunsPanel` / :class:`RunsController`: the run ledger: curves overlaid, config diff, samples.
* :class:`ChatPanel`: A/B chat (base vs tuned, or two adapters), streamed, with Stop.
* :class:`TrainerMonitor`: live charts of any HF ``Trainer`` / TRL ``SFTTrainer`` run (and a ledger record).
* :class:`SweepPanel` / :class:`SweepController`: an optuna sweep with live per-trial curves and a leaderboard.
* :func:`dashboard`: all of them in tabs (Model, Chain race, LoRA lab, Fine-tune, Sweep, Runs), sharing one
  picker.

Names load lazily: importing a controller (``runlora_nb.widgets.picker``) imports no ipywidgets or plotly, and
``import runlora_nb.widgets`` costs nothing until a panel is used.
"""

from __future__ import annotations

import importlib
from typing import Any

# public name → the module that defines it (imported on first use)
_WHERE = {
    "ChainRace": "race_view",
    "ChatPanel": "chat_view",
    "Dashboard": "dashboard",
    "FineTuneController": "finetune",
    "FineTunePanel": "finetune_view",
    "FineTuneSettings": "finetune",
    "LabController": "lab",
    "LabSettings": "lab",
    "LoRALab": "lab_view",
    "ModelPicker": "picker_view",
    "PickerChoice": "picker",
    "PickerController": "picker",
    "RaceController": "race",
    "RaceSettings": "race",
    "RunTrace": "finetune",
    "RunsController": "runs",
    "RunsPanel": "runs_view",
    "SweepController": "sweep",
    "SweepPanel": "sweep_view",
    "SweepSettings": "sweep",
    "TrainerMonitor": "trainer_monitor",
    "dashboard": "dashboard",
    "default_model": "picker",
}

__all__ = sorted(_WHERE)


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module 'runlora_nb.widgets' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_WHERE[name]}", __name__), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_WHERE})
