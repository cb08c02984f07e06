"""JupyterLab panels for runlora_nb (installed as ``runlora_nb.widgets``)."""
