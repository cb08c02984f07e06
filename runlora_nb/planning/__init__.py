"""Planning layer: which chain pair a call should use. Interleaved timing, the calibrated cost model and the
planner (``"flops"``, ``"auto"``, ``"timed"``) with its in-memory and on-disk plan caches.

Owns :mod:`.timing` < :mod:`.costmodel` < :mod:`.planner` (each imports only those to its left). May import
common and core.
"""
