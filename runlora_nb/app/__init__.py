"""App layer: what a person runs. The ``runlora-nb`` CLI, the headless demo, the HTML report and text tables.

Owns :mod:`.cli`, :mod:`.demo`, :mod:`.report` and :mod:`.tables`. May import every other layer of the core;
never ipywidgets, plotly or the panels (the report embeds plotly *specs* as JSON).
"""
