"""Adopt runlora_nb in one line: inject RunLoRA layers into a transformers model, or convert a PEFT model.

* :func:`apply_runlora` replaces the targeted linear layers of a model with :class:`RunLoRALinear` (PEFT's
  target-matching rules and default targets per architecture, see :mod:`.targets`) and freezes the rest.
* :func:`from_peft` converts the LoRA layers of a ``peft.PeftModel`` in place: each layer keeps its class
  (a subclass of PEFT's, so ``save_pretrained``, ``disable_adapter``, ``merge_and_unload`` … keep working),
  its tensors (shared, never copied) and its state; only the forward and backward run through the chains.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from ..core import quant
from ..core.base import describe_base, is_supported_base
from ..nn.layer import ChainArg, ChainDispatch, RunLoRALinear, _check_chain
from .surgery import SEQ_CLS_HEADS, check_saved_names, saved_module_paths, set_submodule, unchanged_on_error
from .targets import ALL_LINEAR as ALL_LINEAR  # the public spelling of "every linear layer", used here before
from .targets import _task_type, find_targets
from .wrappers import unwrap_model

__all__ = [
    "RunLoRAConfig",
    "TrainableParams",
    "apply_runlora",
    "check_rank",
    "find_targets",
    "from_peft",
    "get_peft_model",
    "merge_and_unload",
    "runlora_layers",
    "trainable_parameters",
]


@dataclass
class RunLoRAConfig:
    """The adapter settings of a model built by :func:`apply_runlora` (saved as PEFT's ``adapter_config.json``).

    Attributes:
        r: rank.
        alpha: LoRA alpha.
        dropout: adapter dropout.
        target_modules: what the user asked for (names, a regex, or ``"all-linear"``).
        targets: the module paths actually wrapped.
        use_rslora: alpha / sqrt(r) scaling.
        modules_to_save: modules trained and saved whole (e.g. a classification head).
        task_type: PEFT task type (``"CAUSAL_LM"``, ``"SEQ_CLS"``, …) or None.
        base_model_name_or_path: recorded in the saved config.
        fan_in_fan_out: True for GPT-2 style Conv1D targets (PEFT's flag).
        chain: planner mode or pinned pair.
    """

    r: int = 8
    alpha: float = 16
    dropout: float = 0.0
    target_modules: list[str] | str | None = None
    targets: list[str] = field(default_factory=list)
    use_rslora: bool = False
    modules_to_save: list[str] = field(default_factory=list)
    task_type: str | None = None
    base_model_name_or_path: str | None = None
    fan_in_fan_out: bool = False
    chain: str | tuple[str, str] = "auto"


# --------------------------------------------------------------------------------------------------------------
# injection


def apply_runlora(
    model: nn.Module,
    r: int = 8,
    alpha: float = 16,
    dropout: float = 0.0,
    target_modules: str | Sequence[str] | None = None,
    chain: ChainArg = "auto",
    *,
    exclude_modules: str | Sequence[str] | None = None,
    modules_to_save: Sequence[str] | None = None,
    use_rslora: bool = False,
    adapter_dtype: torch.dtype | None = None,
    init_lora_weights: bool | str = True,
) -> nn.Module:
    """Wrap the targeted linear layers of ``model`` in :class:`RunLoRALinear`, in place, and freeze the rest.

    Args:
        model: a transformers model (LLaMA, OPT, GPT-2, BERT/RoBERTa, …) or any module with linear layers.
        r: rank.
        alpha: LoRA alpha (scaling alpha / r).
        dropout: adapter dropout.
        target_modules: None (PEFT's default for the architecture), ``"all-linear"``, a regex or names.
        chain: planner mode (``"auto"``, ``"flops"``, ``"timed"``) or a pinned pair.
        exclude_modules: names or regex to leave out.
        modules_to_save: modules trained and saved whole, PEFT's rule (a module path or its end, e.g.
            ``"lm_head"``); default for sequence classification: the head (``classifier`` / ``score``), as PEFT
            does (of those two, only the ones the model has are used).
        use_rslora: alpha / sqrt(r) scaling.
        adapter_dtype: adapter dtype (default as PEFT: fp32 on 16-bit and quantized bases).
        init_lora_weights: True (PEFT default), ``"gaussian"`` or False.

    Returns:
        The same model, with ``model.runlora_config`` describing the adapters.

    Raises:
        ValueError: bad r / alpha / dropout / chain, r above min(in, out) of every target, nothing matched, a ``modules_to_save`` name matches no
            module, or the model already has adapters. Nothing is changed when it raises.
        TypeError: ``modules_to_save`` is not a list of names.
    """
    existing = [n for n, _ in runlora_layers(model)]
    if existing:
        raise ValueError(
            f"apply_runlora: {type(model).__name__} already has RunLoRA layers ({existing[0]}, …); load new weights "
            "with load_adapter, or merge_and_unload first"
        )
    checked_chain = _check_chain(chain, float(dropout), "apply_runlora")
    task = _task_type(model)
    if modules_to_save is None:
        modules_to_save = [
            n for n in SEQ_CLS_HEADS if task == "SEQ_CLS" and getattr(model, n, None) is not None
        ]
    check_saved_names(model, modules_to_save, task)
    saved_heads = saved_module_paths(model, modules_to_save) if modules_to_save else []
    targets = find_targets(model, target_modules, exclude_modules, task)
    targets = [t for t in targets if not any(t == h or t.startswith(f"{h}.") for h in saved_heads)]
    check_rank(model, targets, r, adapter_dtype)
    quant.guard_cpu_repack(model)
    with unchanged_on_error(model):  # validated above; a failure past here still leaves the model as it was
        conv1d = _inject(
            model, targets, r, alpha, dropout, checked_chain, use_rslora, adapter_dtype, init_lora_weights
        )
        for name in saved_heads:
            for p in model.get_submodule(name).parameters():
                p.requires_grad_(True)
        cfg = getattr(model, "config", None)
        model.runlora_config = RunLoRAConfig(
            r=r,
            alpha=alpha,
            dropout=float(dropout),
            target_modules=list(target_modules)
            if isinstance(target_modules, list | tuple)
            else target_modules,
            targets=targets,
            use_rslora=use_rslora,
            modules_to_save=list(modules_to_save),
            task_type=task,
            base_model_name_or_path=getattr(cfg, "_name_or_path", None) or None,
            fan_in_fan_out=conv1d,
            chain=checked_chain,
        )
    if _checkpointing(model) and hasattr(model, "enable_input_require_grads"):
        model.enable_input_require_grads()  # checkpointed blocks need an input that requires grad (as PEFT does)
    return model


def check_rank(
    model: nn.Module, targets: Sequence[str], r: int, adapter_dtype: torch.dtype | None = None
) -> None:
    """Refuse a rank that no targeted layer can use, before any adapter is allocated.

    An update of a layer cannot have a rank above ``min(in_features, out_features)``; a rank above that for
    some layers only costs memory (the layer warns once), but above it for every target the adapters are all
    waste and usually a typo (``r=100000``) that would allocate gigabytes.

    Args:
        model: the model.
        targets: module paths to adapt (:func:`find_targets`).
        r: the rank.
        adapter_dtype: adapter dtype (default: PEFT's rule per base layer), for the size in the message.

    Raises:
        ValueError: ``r`` exceeds ``min(in_features, out_features)`` of every target; the message gives the
            largest usable rank and what the adapters would cost.
    """
    if not isinstance(r, int) or isinstance(r, bool) or not targets:
        return  # RunLoRALinear names a bad rank itself
    from ..nn.layer import default_adapter_dtype

    infos = [(path, describe_base(model.get_submodule(path), path)) for path in targets]
    caps = {path: min(info.in_features, info.out_features) for path, info in infos}
    widest = max(caps, key=caps.get)
    if r <= caps[widest]:
        return
    size = sum(
        r
        * (info.in_features + info.out_features)
        * (adapter_dtype or default_adapter_dtype(info.dtype)).itemsize
        for _, info in infos
    )
    raise ValueError(
        f"apply_runlora: r={r} exceeds min(in_features, out_features) of every targeted layer (the largest is "
        f"{caps[widest]}, {widest}); the {len(targets)} adapters would take {size / 2**30:.2f} GiB for no rank "
        f"beyond {caps[widest]}; use r <= {caps[widest]}"
    )


def _inject(model, targets, r, alpha, dropout, chain, use_rslora, adapter_dtype, init_lora_weights) -> bool:
    """Freeze the model and wrap each target; True if any target is a Conv1D (fan_in_fan_out)."""
    for p in model.parameters():
        p.requires_grad_(False)
    conv1d = False
    for path in targets:
        layer = RunLoRALinear(
            model.get_submodule(path),
            r=r,
            alpha=alpha,
            dropout=dropout,
            chain=chain,
            use_rslora=use_rslora,
            adapter_dtype=adapter_dtype,
            init_lora_weights=init_lora_weights,
            name=path,
        )
        layer.train(model.training)
        conv1d = conv1d or layer.info.conv1d
        set_submodule(model, path, layer)
    return conv1d


def _checkpointing(model: nn.Module) -> bool:
    for attr in ("is_activation_checkpointing", "is_gradient_checkpointing"):  # transformers 5 renamed it
        if hasattr(type(model), attr) or attr in vars(model):
            return bool(getattr(model, attr))
    return False


def get_peft_model(model: nn.Module, config, **kwargs) -> nn.Module:
    """``peft.get_peft_model`` without transformers' FutureWarning about ``is_gradient_checkpointing``."""
    import peft

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        return peft.get_peft_model(model, config, **kwargs)


def runlora_layers(model: nn.Module) -> Iterator[tuple[str, ChainDispatch]]:
    """(path, layer) for every RunLoRA layer: :class:`RunLoRALinear` and PEFT layers converted by from_peft."""
    for name, mod in model.named_modules():
        if isinstance(mod, ChainDispatch):
            yield name, mod


@dataclass(frozen=True)
class TrainableParams:
    """Parameter counts, printed like PEFT's ``print_trainable_parameters``."""

    trainable: int
    total: int

    @property
    def percent(self) -> float:
        return 100.0 * self.trainable / max(self.total, 1)

    def __str__(self) -> str:
        return f"trainable params: {self.trainable:,d} || all params: {self.total:,d} || trainable%: {self.percent:.4f}"


def trainable_parameters(model: nn.Module) -> TrainableParams:
    """Count trainable and all parameters (4-bit packed weights count their unpacked elements, as PEFT does)."""
    trainable = total = 0
    for p in model.parameters():
        n = p.numel()
        if type(p).__name__ == "Params4bit":
            n *= 2 * p.element_size()
        total += n
        if p.requires_grad:
            trainable += n
    return TrainableParams(trainable, total)


def merge_and_unload(model: nn.Module) -> nn.Module:
    """Merge every adapter into its base weight and put the plain base layers back.

    Quantized bases are dequantized, updated and requantized (with a warning about rounding). A PEFT model
    converted by :func:`from_peft` is handed to PEFT's own ``merge_and_unload``.

    Args:
        model: a model with RunLoRA layers, a PEFT model, or a bare :class:`RunLoRALinear`; DDP,
            ``torch.compile`` and accelerate containers are looked through.

    Returns:
        The unwrapped model (for a PeftModel, PEFT's base model; for a bare layer, its merged base layer).
    """
    model = unwrap_model(model)
    if hasattr(model, "merge_and_unload") and hasattr(model, "peft_config"):
        return model.merge_and_unload()
    if isinstance(model, RunLoRALinear):
        if not model.merged:
            model.merge()
        return model.base_layer
    for path, layer in list(runlora_layers(model)):
        if not isinstance(layer, RunLoRALinear):
            continue
        if not layer.merged:
            layer.merge()
        set_submodule(model, path, layer.base_layer)
    if hasattr(model, "runlora_config"):
        del model.runlora_config
    return model


# --------------------------------------------------------------------------------------------------------------
# PEFT conversion


class _PeftDispatch(ChainDispatch):
    """Forward of a PEFT LoRA layer through the chains; everything else stays PEFT's."""

    def _runlora_max_dropout(self) -> float:
        return max((getattr(d, "p", 0.0) for d in self.lora_dropout.values()), default=0.0)

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if self.disable_adapters or self.merged or args or kwargs:
            return super().forward(x, *args, **kwargs)  # PEFT's own path (mixed batches, merged, disabled)
        active = [a for a in self.active_adapters if a in self.lora_A]
        if not active:
            return self.base_layer(x)
        if len(active) > 1 or active[0] in self.lora_variant:
            raise ValueError(_unsupported_message(self.name, _features(self, active)))
        name = active[0]
        drop = self.lora_dropout[name]
        p = drop.p if isinstance(drop, nn.Dropout) else 0.0
        return self._dispatch(x, self.lora_A[name].weight, self.lora_B[name].weight, self.scaling[name], p)


_CONVERTED: dict[type, type] = {}


def _converted_class(cls: type) -> type:
    """A module-level subclass ``RunLoRAPeft<PeftClass>`` (registered here so pickling by name works)."""
    if cls not in _CONVERTED:
        new = type(f"RunLoRAPeft{cls.__name__}", (_PeftDispatch, cls), {"__module__": __name__})
        globals()[new.__name__] = new
        _CONVERTED[cls] = new
    return _CONVERTED[cls]


def _features(layer: nn.Module, active: list[str]) -> list[str]:
    found = []
    if len(active) > 1:
        found.append(f"several active adapters {active}")
    for a in active:
        variant = getattr(layer, "lora_variant", {}).get(a)
        if getattr(layer, "use_dora", {}).get(a):
            found.append(f"DoRA (use_dora=True) on adapter '{a}'")
        elif variant is not None:
            found.append(f"the LoRA variant {type(variant).__name__} on adapter '{a}'")
        if getattr(layer, "lora_bias", {}).get(a):
            found.append(f"lora_bias=True on adapter '{a}'")
    return found


def _unsupported_message(name: str, features: list[str]) -> str:
    return (
        f"{name}: runlora_nb runs plain LoRA (one active adapter, no DoRA/variants, no lora_bias); this layer uses "
        f"{'; '.join(features)}. Keep PEFT for this model, or rebuild it with a plain LoraConfig."
    )


def from_peft(peft_model: nn.Module, chain: ChainArg = "auto") -> nn.Module:
    """Convert the LoRA layers of a PEFT model in place so they run through the chains.

    Tensors are shared (nothing is copied) and every PEFT feature that does not touch the forward keeps
    working: ``save_pretrained``, ``disable_adapter()``, ``set_adapter``, ``merge_and_unload``. Outputs equal
    PEFT's (fp32: max relative difference ≤ 1e-6).

    Args:
        peft_model: a ``peft.PeftModel`` (or a model with PEFT LoRA layers inside).
        chain: planner mode or pinned pair for every converted layer.

    Returns:
        The same model.

    Raises:
        ValueError: no LoRA layer found, or a feature runlora_nb cannot run (DoRA and other LoRA variants,
            several active adapters, lora_bias); the message names each, and nothing is converted.
        TypeError: a LoRA layer's base is not a supported linear layer.
    """
    try:
        from peft.tuners.lora import LoraLayer
    except ImportError as err:  # pragma: no cover - peft is a dependency
        raise ImportError("from_peft needs the peft package: pip install peft") from err
    lora = [(n, m) for n, m in peft_model.named_modules() if isinstance(m, LoraLayer)]
    if not lora:
        raise ValueError(
            f"from_peft: {type(peft_model).__name__} has no PEFT LoRA layers; build it with "
            "peft.get_peft_model(model, LoraConfig(...)) first, or use apply_runlora(model) directly"
        )
    problems, convert, skipped = [], [], []
    for name, mod in lora:
        if isinstance(mod, ChainDispatch):
            continue  # already converted
        base = mod.get_base_layer()
        if not is_supported_base(base) or type(mod).__name__ not in ("Linear", "Linear4bit", "Linear8bitLt"):
            skipped.append(f"{name} ({type(mod).__name__})")
            continue
        active = [a for a in mod.active_adapters if a in mod.lora_A]
        features = _features(mod, active)
        if features:
            problems.append(_unsupported_message(name, features))
        else:
            convert.append((name, mod, describe_base(base, name)))
    if problems:
        raise ValueError("from_peft: nothing was converted.\n" + "\n".join(problems))
    max_p = max((getattr(d, "p", 0.0) for _, m, _ in convert for d in m.lora_dropout.values()), default=0.0)
    checked = _check_chain(chain, max_p, "from_peft")
    quant.guard_cpu_repack(peft_model)
    for name, mod, info in convert:
        mod.__class__ = _converted_class(type(mod))
        mod._init_dispatch(info, checked)
        mod.name = name
    if skipped:
        warnings.warn(
            f"from_peft: left {len(skipped)} LoRA layer(s) on PEFT's own path (not linear): {', '.join(skipped[:5])}",
            UserWarning,
            stacklevel=2,
        )
    return peft_model
