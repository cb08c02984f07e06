"""LoRA lab state: the arithmetic behind the chains, instantly (no timing).

For a layer of N tokens, i → o features and rank r, :class:`LabController` gives the matmul FLOPs of every valid
(forward, backward) chain pair (:func:`runlora_nb.core.chains.pair_flops`), the pair with the fewest FLOPs (the
planner in ``mode="flops"``) with its formulas, which pair wins over a grid of (N, r), and the tensors PEFT and
runlora_nb keep for backward with their bytes. No widget is imported here.
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import pandas as pd

from runlora_nb.core.chains import BACKWARD, FORWARD, Needs, pair_flops, valid_pairs
from runlora_nb.planning.planner import ChainPlan, plan_chains

__all__ = [
    "ALL_PAIRS",
    "GRID_RANKS",
    "GRID_TOKENS",
    "PROXY",
    "LabController",
    "LabSettings",
    "WinnerMap",
    "warm_up",
]

GRID_TOKENS: tuple[int, ...] = tuple(2**k for k in range(4, 15))  # 16 … 16384
GRID_RANKS: tuple[int, ...] = tuple(2**k for k in range(0, 9))  # 1 … 256
# The saved-tensor structure is recorded on a small layer whose four sizes differ, so every tensor's shape
# tells which of N, i, o, r it is made of; bytes are then scaled to the chosen sizes.
PROXY: dict[str, int] = {"N": 12, "i": 10, "o": 14, "r": 2}
ALL_PAIRS: tuple[str, ...] = tuple("+".join(p) for p in valid_pairs(0.0))  # every pair, table order


@dataclass(frozen=True)
class LabSettings:
    """A layer and setting.

    Attributes:
        tokens: N.
        in_features: i.
        out_features: o.
        rank: r.
        dropout: adapter dropout (> 0 rules out the merged chains; PEFT then keeps a dropped copy of X).
        x_needs_grad: the layer's input needs a gradient (a layer inside a network; False for the first one).
    """

    tokens: int = 2048
    in_features: int = 1024
    out_features: int = 1024
    rank: int = 16
    dropout: float = 0.0
    x_needs_grad: bool = True

    @property
    def needs(self) -> Needs:
        return Needs(self.x_needs_grad, True, True)

    @property
    def sizes(self) -> dict[str, int]:
        return {"N": self.tokens, "i": self.in_features, "o": self.out_features, "r": self.rank}


@dataclass(frozen=True)
class WinnerMap:
    """Which pair has the fewest FLOPs over a grid of token counts and ranks.

    Attributes:
        tokens: the N values (columns).
        ranks: the r values (rows).
        pairs: the pair names that appear, in table order; ``index`` refers to it.
        index: ``index[row, col]`` is the winning pair's position in ``pairs`` for (ranks[row], tokens[col]).
        names: ``names[row][col]``, the winning pair's name.
    """

    tokens: tuple[int, ...]
    ranks: tuple[int, ...]
    pairs: tuple[str, ...]
    index: np.ndarray
    names: tuple[tuple[str, ...], ...]


class LabController:
    """The teaching panel's numbers (pure arithmetic; fast enough to follow a slider).

    Args:
        **settings: :class:`LabSettings` fields.
    """

    def __init__(self, **settings: Any) -> None:
        self.settings = LabSettings(**settings)

    def set(self, **changes: Any) -> LabSettings:
        """Change settings.

        Raises:
            ValueError: a non-positive size or a dropout outside [0, 1).
        """
        new = replace(self.settings, **changes)
        if min(new.tokens, new.in_features, new.out_features, new.rank) < 1:
            raise ValueError(f"sizes must be positive, got {new.sizes}")
        if not 0.0 <= new.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {new.dropout}")
        self.settings = new
        return new

    # ----------------------------------------------------------------------------------------- FLOPs
    def pairs(self) -> pd.DataFrame:
        """Every valid pair: pair, fwd, bwd, flops (``pair_flops``), gflops, chosen, fwd/bwd formulas."""
        s = self.settings
        chosen = self.chosen().pair
        rows = [
            {
                "pair": f"{f}+{b}",
                "fwd": f,
                "bwd": b,
                "flops": pair_flops(f, b, s.tokens, s.in_features, s.out_features, s.rank, s.needs),
                "chosen": (f, b) == chosen,
                "fwd_formula": FORWARD[f].formula,
                "bwd_formula": BACKWARD[b].formula,
            }
            for f, b in valid_pairs(s.dropout)
        ]
        df = pd.DataFrame(rows)
        df.insert(4, "gflops", df["flops"] / 1e9)
        return df

    def chosen(self, settings: LabSettings | None = None) -> ChainPlan:
        """The planner's fewest-FLOP pair (``plan_chains(..., mode="flops")``) for the settings."""
        s = settings or self.settings
        return plan_chains(
            s.tokens, s.in_features, s.out_features, s.rank, needs=s.needs, dropout=s.dropout, mode="flops"
        )

    def explain(self) -> dict[str, str]:
        """The chosen pair's id, formulas, FLOPs and the planner's reason."""
        plan = self.chosen()
        return {
            "pair": f"{plan.fwd}+{plan.bwd}",
            "forward": FORWARD[plan.fwd].formula,
            "backward": BACKWARD[plan.bwd].formula,
            "gflops": f"{plan.flops / 1e9:.4g}",
            "reason": plan.reason,
        }

    def winner_map(
        self, tokens: tuple[int, ...] = GRID_TOKENS, ranks: tuple[int, ...] = GRID_RANKS
    ) -> WinnerMap:
        """The fewest-FLOP pair at each (N, r) of the grid, for the current i, o, dropout and needs."""
        s = self.settings
        names = tuple(
            tuple(
                "+".join(self.chosen(replace(s, tokens=n, rank=r)).pair)
                for n in tokens  # columns
            )
            for r in ranks  # rows
        )
        order = ["+".join(p) for p in valid_pairs(s.dropout)]
        present = tuple(p for p in order if any(p in row for row in names))
        index = np.array([[present.index(name) for name in row] for row in names], dtype=int)
        return WinnerMap(tuple(tokens), tuple(ranks), present, index, names)

    # ----------------------------------------------------------------------------------------- memory
    def saved_tensors(self) -> pd.DataFrame:
        """What PEFT and runlora_nb keep for backward, with bytes at the chosen sizes.

        The tensors are recorded with ``saved_tensors_hooks`` (:func:`runlora_nb.measure.layer_saved_tensors`) on a
        small proxy layer (:data:`PROXY` sizes, fp32); each shape is rewritten in N, i, o, r and its bytes
        scaled to the chosen sizes.

        Returns:
            Columns backend, tensor, shape (symbolic, e.g. ``"N×i"``), elements, bytes, kind.
        """
        s = self.settings
        proxy = _proxy_saved(s.dropout > 0, s.x_needs_grad)
        symbol = {v: k for k, v in PROXY.items()}
        sizes = s.sizes
        rows = []
        for row in proxy.itertuples(index=False):
            dims = [symbol.get(int(d), str(int(d))) for d in row.shape]
            elements = math.prod(sizes.get(d, int(d) if d.isdigit() else 1) for d in dims)
            per_element = row.bytes / max(math.prod(int(d) for d in row.shape), 1)
            rows.append(
                {
                    "backend": row.backend,
                    "tensor": row.tensor,
                    "shape": "×".join(dims) or "scalar",
                    "elements": elements,
                    "bytes": round(elements * per_element),
                    "kind": row.kind,
                }
            )
        return pd.DataFrame(rows, columns=["backend", "tensor", "shape", "elements", "bytes", "kind"])

    def saved_ready(self) -> bool:
        """The proxy recording for the current dropout / needs is cached (:meth:`saved_tensors` is instant)."""
        s = self.settings
        return (s.dropout > 0, s.x_needs_grad) in _PROXY_CACHE

    def saved_totals(self) -> dict[str, int]:
        """Activation bytes (activations and masks, not parameters) each backend keeps."""
        df = self.saved_tensors()
        acts = df[df["kind"] != "parameter"]
        return {b: int(acts.loc[acts["backend"] == b, "bytes"].sum()) for b in ("peft", "runlora")}


_PROXY_CACHE: dict[tuple[bool, bool], pd.DataFrame] = {}
_PROXY_LOCK = threading.Lock()


def _proxy_saved(dropout: bool, x_needs_grad: bool) -> pd.DataFrame:
    """The proxy layer's saved tensors for (dropout > 0, X needs grad), recorded once per process."""
    key = (dropout, x_needs_grad)
    with _PROXY_LOCK:
        if key not in _PROXY_CACHE:
            from runlora_nb.measure import layer_saved_tensors

            from .tasks import quiet_imports

            quiet_imports()  # the first PEFT layer imports peft: keep its warnings out of the notebook
            p = PROXY
            # plan the proxy's runlora layer before recording, so that a first-time cost-model calibration
            # (tensors of its own) runs outside the recording
            plan_chains(
                p["N"], p["i"], p["o"], p["r"], needs=Needs(x_needs_grad, True, True), dropout=0.1 * dropout
            )
            _PROXY_CACHE[key] = layer_saved_tensors(
                p["N"], p["i"], p["o"], p["r"], dropout=0.1 if dropout else 0.0, x_requires_grad=x_needs_grad
            )
        return _PROXY_CACHE[key]


def warm_up() -> None:
    """Record the four proxy cases (dropout or not × X needs grad or not), e.g. in a background thread."""
    for dropout in (False, True):
        for x_needs_grad in (True, False):
            _proxy_saved(dropout, x_needs_grad)
