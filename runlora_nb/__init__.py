"""runlora_nb: LoRA layers that pick the cheapest chain of matrix products and keep only X for backward.

The method is from "Run LoRA Run: Faster and Lighter LoRA Implementations" (arXiv 2312.03415).
"""

from .chains import BACKWARD, FORWARD, Chain, Needs, valid_pairs
from .function import CallSpec, lora_apply
from .layer import RunLoRALinear
from .planner import ChainPlan, plan_chains

__version__ = "0.1.0"
__all__ = [
    "BACKWARD",
    "FORWARD",
    "CallSpec",
    "Chain",
    "ChainPlan",
    "Needs",
    "RunLoRALinear",
    "__version__",
    "lora_apply",
    "plan_chains",
    "valid_pairs",
]
