"""Core layer: the LoRA math. The chain table (each chain a small function with its GEMM list), the autograd
function that saves only X, the regenerated dropout mask, base-weight views and quantized bases, and the
saved-tensor recorder.

Owns :mod:`.chains`, :mod:`.function`, :mod:`.dropout`, :mod:`.base`, :mod:`.quant` and :mod:`.memory`.
May import only :mod:`runlora_nb.common` (and torch, numba, bitsandbytes). Knows nothing of planning, PEFT or UI.
"""
