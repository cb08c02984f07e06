"""Common layer: the cache root and atomic file/folder writers every other layer uses.

Owns :mod:`.paths`. May import nothing from runlora_nb.
"""
