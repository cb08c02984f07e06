"""The dashboard: the panels in tabs over one shared picker; close releases everything."""

from __future__ import annotations

import ipywidgets as widgets
from panel_helpers import SMALL_LAYER, all_widgets

from runlora_nb.widgets import ChainRace, FineTunePanel, LoRALab, ModelPicker, dashboard
from runlora_nb.widgets.dashboard import TAB_TITLES
from runlora_nb.widgets.runs_view import RunsPanel
from runlora_nb.widgets.sweep_view import SweepPanel


def test_dashboard_composes_the_panels_over_one_picker(tmp_path):
    dash = dashboard("tiny-llama", race=SMALL_LAYER, finetune={"steps": 2, "output_dir": str(tmp_path / "a")})
    assert isinstance(dash, widgets.VBox)
    assert dash.tabs.titles == TAB_TITLES
    assert [type(p) for p in dash.tabs.children] == [
        ModelPicker,
        ChainRace,
        LoRALab,
        FineTunePanel,
        SweepPanel,
        RunsPanel,
    ]
    shared = dash.picker.controller
    assert dash.race.controller.picker is shared and dash.finetune.controller.picker is shared
    assert dash.picker.task.join(60) and not shared.stale  # autoload ran in the background
    dash.picker.r.value = 12
    assert dash.finetune.controller.config().r == 12
    assert "r=12" in dash.finetune.choice_html.value
    dash.race.source.value = "model"
    dash.race.reps.value = 1
    dash.race.race_button.click()
    assert dash.race.controller.join(60)
    assert set(dash.race.controller.result["rank"]) == {12}
    # a finished fine-tune shows up in the Runs tab without a click on Refresh
    before = len(dash.runs.controller.runs)
    dash.finetune.controller.run()
    assert len(dash.runs.controller.runs) == before + 1
    assert len(dash.runs.picker.options) == before + 1
    dash.tabs.selected_index = TAB_TITLES.index("Runs")  # opening the tab re-reads the ledger too
    tree = all_widgets(dash)
    figures = [dash.race.figure, dash.lab.figure, dash.finetune.figure, dash.runs.figure, dash.sweep.figure]
    dash.close()
    assert all(w.comm is None for w in tree + figures)
    assert len(shared.listeners) == 0
    dash.close()
