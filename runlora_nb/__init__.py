"""runlora_nb: LoRA layers that pick the cheapest chain of matrix products and keep only X for backward.

The method is from "Run LoRA Run: Faster and Lighter LoRA Implementations" (arXiv 2312.03415).

One-line adoption::

    from runlora_nb import from_peft, apply_runlora, save_adapter
    from_peft(peft_model)          # convert a PEFT LoRA model in place
    apply_runlora(model, r=16)     # or inject RunLoRA layers into a transformers model

Layers, bottom up (imports only point down; see docs/architecture.md): ``common`` < ``core`` < ``planning`` <
``nn`` < ``integrations`` < ``assets`` < ``measure`` < ``train`` < ``ledger`` < ``assess`` < ``app``; the panels in ``runlora_nb.widgets``
sit on top and the core never imports them.
"""

from .common import quiet  # noqa: F401  first: filters known library noise before bitsandbytes is imported
from .core.chains import BACKWARD, FORWARD, Chain, Needs, valid_pairs
from .core.function import CallSpec, lora_apply
from .integrations.adapters import AdapterError, load_adapter, save_adapter
from .integrations.inject import (
    RunLoRAConfig,
    apply_runlora,
    find_targets,
    from_peft,
    merge_and_unload,
    runlora_layers,
    trainable_parameters,
)
from .integrations.plans import pin_plans, record_plans
from .nn.layer import RunLoRALinear
from .planning.planner import ChainPlan, plan_chains

__version__ = "0.1.0"
__all__ = [
    "BACKWARD",
    "FORWARD",
    "AdapterError",
    "CallSpec",
    "Chain",
    "ChainPlan",
    "Needs",
    "RunLoRAConfig",
    "RunLoRALinear",
    "__version__",
    "apply_runlora",
    "find_targets",
    "from_peft",
    "load_adapter",
    "lora_apply",
    "merge_and_unload",
    "pin_plans",
    "plan_chains",
    "record_plans",
    "runlora_layers",
    "save_adapter",
    "trainable_parameters",
    "valid_pairs",
]
