"""runlora_nb: LoRA layers that pick the cheapest chain of matrix products and keep only X for backward."""

__version__ = "0.1.0"
__all__ = ["__version__"]
