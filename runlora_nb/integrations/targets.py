"""Which layers of a model get an adapter: PEFT's target-matching rules and its default targets.

:func:`find_targets` turns ``target_modules`` (PEFT's default for the architecture, ``"all-linear"``, a
full-match regex, or a list of exact paths or last components) into the module paths
:func:`~runlora_nb.integrations.inject.apply_runlora` wraps, in module order. Unlike PEFT, a listed name that
matches no linear layer is refused rather than dropped, so a typo cannot silently train fewer layers.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from torch import nn

from ..core.base import is_supported_base
from .surgery import SEQ_CLS_HEADS

__all__ = ["ALL_LINEAR", "find_targets"]

ALL_LINEAR = "all-linear"
# Used when PEFT's own table is unavailable; PEFT's mapping is preferred (same values for these families).
_DEFAULT_TARGETS = {
    "llama": ["q_proj", "v_proj"],
    "mistral": ["q_proj", "v_proj"],
    "opt": ["q_proj", "v_proj"],
    "gpt2": ["c_attn"],
    "bert": ["query", "value"],
    "roberta": ["query", "value"],
}


def _matches(key: str, targets: str | Sequence[str]) -> bool:
    """PEFT's rule: a string is a full-match regex; a list matches exact paths or '.'-suffixes."""
    if isinstance(targets, str):
        return re.fullmatch(targets, key) is not None
    return key in targets or any(key.endswith(f".{t}") for t in targets)


def _task_type(model: nn.Module) -> str | None:
    name = type(model).__name__
    for suffix, task in (
        ("ForCausalLM", "CAUSAL_LM"),
        ("LMHeadModel", "CAUSAL_LM"),
        ("ForSequenceClassification", "SEQ_CLS"),
        ("ForTokenClassification", "TOKEN_CLS"),
        ("ForQuestionAnswering", "QUESTION_ANS"),
    ):
        if name.endswith(suffix):
            return task
    return None


def _model_type(model: nn.Module) -> str | None:
    cfg = getattr(model, "config", None)
    return getattr(cfg, "model_type", None)


def _default_targets(model: nn.Module) -> list[str]:
    mtype = _model_type(model)
    try:
        from peft.utils import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as table
    except ImportError:  # PEFT is a dependency, but keep the injector usable without it
        table = _DEFAULT_TARGETS
    if mtype in table:
        return list(table[mtype])
    raise ValueError(
        f"apply_runlora: no default target modules for model type {mtype!r}; pass target_modules, e.g. "
        f"['q_proj', 'v_proj'] or 'all-linear'"
    )


def _excluded_by_head(model: nn.Module, task_type: str | None) -> set[str]:
    """Output embeddings (lm_head) and classification heads are never adapted by 'all-linear'."""
    out = set()
    get_out = getattr(model, "get_output_embeddings", None)
    head = get_out() if callable(get_out) else None
    if head is None and task_type == "SEQ_CLS":
        head = next((getattr(model, n) for n in SEQ_CLS_HEADS if getattr(model, n, None) is not None), None)
    if head is not None:
        for name, mod in model.named_modules():
            if mod is head:
                out.add(name)
                out.update(f"{name}.{sub}" for sub, _ in mod.named_modules() if sub)
    return out


def find_targets(
    model: nn.Module,
    target_modules: str | Sequence[str] | None = None,
    exclude_modules: str | Sequence[str] | None = None,
    task_type: str | None = None,
) -> list[str]:
    """Module paths that :func:`~.inject.apply_runlora` would wrap, with PEFT's matching rules.

    Args:
        model: a transformers (or any) model.
        target_modules: None (PEFT's default for the architecture), ``"all-linear"``, a regex (full match) or
            a list of names (exact paths or last components such as ``"q_proj"``).
        exclude_modules: same forms; matches are left out.
        task_type: used to leave classification heads out of ``"all-linear"``.

    Returns:
        Paths of supported linear layers that match, in module order (PEFT's order, so adapters are created —
        and randomly initialised — in the same sequence as PEFT's).

    Raises:
        ValueError: nothing matches, or a name of a ``target_modules`` list matches no linear layer (the
            message lists the linear layers that exist).
    """
    linear = [name for name, mod in model.named_modules() if name and is_supported_base(mod)]
    linear = [n for n in linear if ".lora_A" not in n and ".lora_B" not in n and ".base_layer" not in n]
    if isinstance(target_modules, str) and target_modules.lower() == ALL_LINEAR:
        excluded = _excluded_by_head(model, task_type or _task_type(model))
        found = [n for n in linear if n not in excluded]
    else:
        targets = _default_targets(model) if target_modules is None else target_modules
        found = [n for n in linear if _matches(n, targets)]
    if exclude_modules:
        found = [n for n in found if not _matches(n, exclude_modules)]
    if not found:
        leaves = sorted({n.rsplit(".", 1)[-1] for n in linear})
        raise ValueError(
            f"apply_runlora: target_modules={target_modules!r} matches no linear layer of {type(model).__name__}; "
            f"its linear layers are named {leaves}"
        )
    if target_modules is not None and not isinstance(target_modules, str):
        _refuse_unknown_names(model, target_modules, linear)
    return found


def _refuse_unknown_names(model: nn.Module, targets: Sequence[str], linear: Sequence[str]) -> None:
    """Refuse names of a target list that match no linear layer.

    PEFT adapts the names that match and drops the others silently, so a typo (``q_prj``) trains fewer
    layers than asked for; here each name must match a layer (an exact path or a path's last components).

    Raises:
        ValueError: names that match nothing, with the linear layer names the model has.
    """
    unknown = [t for t in targets if not any(n == t or n.endswith(f".{t}") for n in linear)]
    if unknown:
        leaves = sorted({n.rsplit(".", 1)[-1] for n in linear})
        raise ValueError(
            f"apply_runlora: target_modules name(s) {unknown} match no linear layer of {type(model).__name__}; "
            f"its linear layers are named {leaves} (or pass 'all-linear' or a regex)"
        )
