"""Module-tree edits shared by the injector and the adapter loader: put a module at a path, find the modules a
``modules_to_save`` list selects (PEFT's rule), and undo every structural change when a step fails.
"""

from __future__ import annotations

import contextlib
import difflib
from collections.abc import Iterator, Sequence

from torch import nn

__all__ = ["SEQ_CLS_HEADS", "check_saved_names", "saved_module_paths", "set_submodule", "unchanged_on_error"]

# PEFT adds both to modules_to_save for SEQ_CLS and wraps those the model has
SEQ_CLS_HEADS = ("classifier", "score")


def set_submodule(model: nn.Module, path: str, new: nn.Module) -> None:
    """Put ``new`` at ``path`` (a dotted module path) in ``model``."""
    parent_path, _, child = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    setattr(parent, child, new)


def saved_module_paths(model: nn.Module, names: Sequence[str]) -> list[str]:
    """Paths of the modules ``modules_to_save`` names select, with PEFT's rule (the path ends with the name).

    Args:
        model: the transformers model.
        names: e.g. ``["classifier", "score"]``.

    Returns:
        Matching module paths in module order; a match inside an earlier match is left out.
    """
    paths: list[str] = []
    for key, _ in model.named_modules():
        if key and not any(key.startswith(f"{p}.") for p in paths) and any(key.endswith(n) for n in names):
            paths.append(key)
    return paths


def check_saved_names(model: nn.Module, names: Sequence[str], task: str | None) -> None:
    """Every name must select a module (PEFT's own seq-cls heads only where the model has them).

    Raises:
        TypeError: ``names`` is not a list of non-empty strings.
        ValueError: a name matches no module (the message suggests close names).
    """
    if isinstance(names, str) or not all(isinstance(n, str) and n for n in names):
        raise TypeError(
            f"apply_runlora: modules_to_save={names!r} must be a list of module names, e.g. ['classifier']"
        )
    bad = [
        n
        for n in names
        if not saved_module_paths(model, [n]) and not (task == "SEQ_CLS" and n in SEQ_CLS_HEADS)
    ]
    if bad:
        leaves = sorted({k.rsplit(".", 1)[-1] for k, _ in model.named_modules() if k})
        close = sorted({c for n in bad for c in difflib.get_close_matches(n.rsplit(".", 1)[-1], leaves, 3)})
        hint = (
            f"did you mean {close}?"
            if close
            else f"its top-level modules are {[k for k, _ in model.named_children()]}"
        )
        raise ValueError(
            f"apply_runlora: modules_to_save names {bad} match no module of {type(model).__name__}; {hint} "
            "Fix the names (a module path or its last part, e.g. 'lm_head'); nothing was changed"
        )


_MISSING = object()


@contextlib.contextmanager
def unchanged_on_error(model: nn.Module) -> Iterator[None]:
    """Undo every structural change to ``model`` if the block raises: submodules, requires_grad, train/eval
    flags and ``model.runlora_config`` are put back exactly (parameter values are not snapshotted)."""
    children = [(m, dict(m._modules)) for m in model.modules()]
    grads = [(p, p.requires_grad) for p in model.parameters()]
    modes = [(m, m.training) for m in model.modules()]
    cfg = model.__dict__.get("runlora_config", _MISSING)
    try:
        yield
    except BaseException:
        for mod, kids in children:
            mod._modules.clear()
            mod._modules.update(kids)
        for p, g in grads:
            p.requires_grad_(g)
        for mod, training in modes:
            mod.training = training
        if cfg is _MISSING:
            model.__dict__.pop("runlora_config", None)
        else:
            model.__dict__["runlora_config"] = cfg
        raise
