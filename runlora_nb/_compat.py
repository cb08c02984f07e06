"""Old flat module paths (``runlora_nb.chains``, ``runlora_nb.bench``, …) for one release.

Until 0.2 the package was one flat folder. Those paths still import: a path whose module only moved is the
moved module itself (so ``monkeypatch.setattr`` on it still works); a path whose module was split is a
read-only view merging the public and private names of its parts. Each import warns once with the new path.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
import warnings

__all__ = ["OLD_PATHS", "install"]

# old flat module → new module(s), first match wins for a name
OLD_PATHS: dict[str, tuple[str, ...]] = {
    "paths": ("common.paths",),
    "chains": ("core.chains",),
    "dropout": ("core.dropout",),
    "function": ("core.function",),
    "base": ("core.base",),
    "quant": ("core.quant",),
    "memory": ("core.memory",),
    "costmodel": ("planning.costmodel",),
    "timing": ("planning.timing",),
    "planner": ("planning.planner",),
    "layer": ("nn.layer",),
    "inject": ("integrations.inject",),
    "adapters": ("integrations.adapters",),
    "tokenizers_offline": ("assets.tokenizer",),
    "zoo": ("assets.zoo",),
    "data": ("assets.datasets", "assets.tokenized", "assets.corpora", "assets.textfiles"),
    "bench": ("measure", "measure.layer_race", "measure.model_race", "measure.xray", "measure.grid"),
    "train": ("tuning", "tuning.engine", "integrations.plans"),
    "cli": ("app.cli",),
    "demo": ("app.demo",),
    "report": ("app.report",),
}
_PKG = __name__.rpartition(".")[0]


class _OldPathFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, fullname, path=None, target=None):
        pkg, _, short = fullname.rpartition(".")
        if pkg != _PKG or short not in OLD_PATHS:
            return None
        return importlib.util.spec_from_loader(fullname, self)

    def create_module(self, spec):
        return None  # default module; exec_module fills or replaces it

    def exec_module(self, module):
        short = module.__name__.rpartition(".")[2]
        targets = [importlib.import_module(f"{_PKG}.{t}") for t in OLD_PATHS[short]]
        new = ", ".join(t.__name__ for t in targets)
        warnings.warn(
            f"{module.__name__} moved to {new}; the old path works until runlora_nb 0.2",
            DeprecationWarning,
            stacklevel=2,
        )
        if len(targets) == 1:
            sys.modules[module.__name__] = targets[0]  # the import statement returns the moved module itself
            return
        merged: dict[str, object] = {}
        for target in reversed(targets):
            merged.update({k: v for k, v in vars(target).items() if not k.startswith("__")})
        module.__dict__.update(merged)
        module.__doc__ = f"Deprecated alias of {new}."
        module.__all__ = sorted({n for t in targets for n in getattr(t, "__all__", ())})


def install() -> None:
    """Register the old-path finder once (idempotent)."""
    if not any(isinstance(f, _OldPathFinder) for f in sys.meta_path):
        sys.meta_path.append(_OldPathFinder())
