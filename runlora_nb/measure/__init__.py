"""Measure layer: races (layers, grids, whole models), the saved-tensor X-ray and memory estimates.

Owns: :mod:`.spec` (frozen settings, results, columns), :mod:`.layer_race`, :mod:`.grid`, :mod:`.model_race`,
:mod:`.xray`, :mod:`.adapter_xray` (what each adapter learnt), :mod:`.estimate` and :mod:`.memory_ledger` (predict, then measure). May import common, core,
planning, nn, integrations and assets; never train, ledger, assess, app or widgets. Results are tidy pandas DataFrames; nothing here draws.
"""

from .adapter_xray import adapter_xray, saved_adapter_xray
from .estimate import estimate_memory
from .grid import check_targets, geomean, grid_specs, race_grid
from .layer_race import race_layer
from .memory_ledger import MemoryLedger
from .model_race import MODEL_COLUMNS, ModelRace, adapter_variants, race_model, random_batch
from .spec import DTYPES, GRID, LAYER_COLUMNS, SPEC_COLUMNS, LayerSpec, Measurement, dtype_name
from .xray import compare_saved_tensors, layer_saved_tensors, saved_tensors_report

__all__ = [
    "DTYPES",
    "GRID",
    "LAYER_COLUMNS",
    "MODEL_COLUMNS",
    "SPEC_COLUMNS",
    "LayerSpec",
    "Measurement",
    "MemoryLedger",
    "ModelRace",
    "adapter_variants",
    "adapter_xray",
    "check_targets",
    "compare_saved_tensors",
    "dtype_name",
    "estimate_memory",
    "geomean",
    "grid_specs",
    "layer_saved_tensors",
    "race_grid",
    "race_layer",
    "race_model",
    "random_batch",
    "saved_adapter_xray",
    "saved_tensors_report",
]
