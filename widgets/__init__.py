"""JupyterLab panels for runlora_nb (installed as ``runlora_nb.widgets``; the core never imports it).

Each panel is a thin ipywidgets + plotly ``FigureWidget`` view over a controller that holds the state and calls
the core; controllers import no widget, so scripts and tests drive them directly.

* :class:`ModelPicker` / :class:`PickerController`: model, LoRA setting, parameter counts, memory estimate.
* :class:`ChainRace` / :class:`RaceController`: race every chain pair, the planner, PEFT and the frozen floor.
* :class:`LoRALab` / :class:`LabController`: FLOPs per pair, the winner over (N, r), saved tensors.
* :class:`FineTunePanel` / :class:`FineTuneController`: train with live curves, Stop, PEFT overlay.
* :class:`RunsPanel` / :class:`RunsController`: the run ledger: curves overlaid, config diff, samples.
* :class:`ChatPanel`: A/B chat (base vs tuned, or two adapters), streamed, with Stop.
* :class:`TrainerMonitor`: live charts of any HF ``Trainer`` / TRL ``SFTTrainer`` run (and a ledger record).
* :func:`dashboard`: all of them in tabs (Model, Chain race, LoRA lab, Fine-tune, Runs), sharing one picker.
"""

from .chat_view import ChatPanel
from .dashboard import Dashboard, dashboard
from .finetune import FineTuneController, FineTuneSettings, RunTrace
from .finetune_view import FineTunePanel
from .lab import LabController, LabSettings
from .lab_view import LoRALab
from .picker import PickerChoice, PickerController, default_model
from .picker_view import ModelPicker
from .race import RaceController, RaceSettings
from .race_view import ChainRace
from .runs import RunsController
from .runs_view import RunsPanel
from .trainer_monitor import TrainerMonitor

__all__ = [
    "ChainRace",
    "ChatPanel",
    "Dashboard",
    "FineTuneController",
    "FineTunePanel",
    "FineTuneSettings",
    "LabController",
    "LabSettings",
    "LoRALab",
    "ModelPicker",
    "PickerChoice",
    "PickerController",
    "RaceController",
    "RaceSettings",
    "RunTrace",
    "RunsController",
    "RunsPanel",
    "TrainerMonitor",
    "dashboard",
    "default_model",
]
