"""Common layer: the cache root and atomic file/folder writers every other layer uses, and rounding bounds.

Owns :mod:`.paths` and :mod:`.numerics`. May import nothing from runlora_nb.
"""
