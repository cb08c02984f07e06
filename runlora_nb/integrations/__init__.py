"""Integrations layer: Hugging Face PEFT and transformers. Inject RunLoRA layers (``apply_runlora``), convert PEFT
models in place (``from_peft``), save and load PEFT-format adapters, and tabulate per-module plans.

Owns :mod:`.targets` < :mod:`.inject`, :mod:`.surgery`, :mod:`.adapters` (its files in :mod:`.adapter_files`) and :mod:`.plans`;
:mod:`.wrappers` looks through DDP / ``torch.compile`` / accelerate containers and gathers FSDP2 shards.
May import common, core, planning and nn.
"""

from .trainer_checkpoints import adapter_checkpoints

__all__ = ["adapter_checkpoints"]
