import importlib


def test_core_and_widgets_import():
    core = importlib.import_module("runlora_nb")
    widgets = importlib.import_module("runlora_nb.widgets")
    assert core.__version__
    assert widgets.__name__ == "runlora_nb.widgets"
