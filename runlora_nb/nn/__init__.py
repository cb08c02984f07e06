"""Modules layer: :class:`~runlora_nb.nn.layer.RunLoRALinear`, the drop-in LoRA linear layer that plans its chain
per call shape.

Owns :mod:`.layer`. May import common, core and planning.
"""
