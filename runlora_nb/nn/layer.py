"""``RunLoRALinear``: a LoRA layer that picks its chain pair per call and keeps only X for backward."""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence

import torch
from torch import nn

from ..core import quant
from ..core.base import BaseInfo, describe_base
from ..core.chains import BACKWARD, FORWARD, Needs, pair_flops, pair_temp_bytes, valid_pairs
from ..core.function import CallSpec, lora_apply
from ..planning.planner import MODES, ChainPlan, plan_chains
from .compiled import lora_linear

__all__ = ["ChainDispatch", "RunLoRALinear", "default_adapter_dtype"]

ChainArg = str | Sequence[str]
_RANK_WARNED: set[tuple[int, int]] = set()  # (r, min(i, o)) classes already warned about in this process


def default_adapter_dtype(base_dtype: torch.dtype) -> torch.dtype:
    """PEFT's default: fp32 adapters on fp16 / bf16 (and quantized) bases, the base dtype otherwise."""
    return base_dtype if base_dtype in (torch.float32, torch.float64) else torch.float32


def _check_chain(chain: ChainArg | ChainPlan | Mapping, dropout: float, name: str) -> str | tuple[str, str]:
    if isinstance(chain, Mapping):  # a recorded plan (ChainPlan.to_dict()): pin its pair
        chain = ChainPlan.from_dict(chain)
    if isinstance(chain, ChainPlan):
        chain = chain.pair
    if isinstance(chain, str):
        if chain not in MODES:
            raise ValueError(
                f"{name}: chain={chain!r} is not a planner mode; use one of {MODES} or a pair like "
                f"('fwd1', 'bwd1') with fwd in {sorted(FORWARD)} and bwd in {sorted(BACKWARD)}"
            )
        return chain
    pair = tuple(chain)
    if len(pair) != 2 or pair[0] not in FORWARD or pair[1] not in BACKWARD:
        valid = ", ".join(f"({f!r}, {b!r})" for f, b in valid_pairs(dropout))
        raise ValueError(f"{name}: unknown chain pair {chain!r}; valid pairs here: {valid}")
    if dropout > 0 and (FORWARD[pair[0]].merged or BACKWARD[pair[1]].merged):
        valid = ", ".join(f"({f!r}, {b!r})" for f, b in valid_pairs(dropout))
        raise ValueError(
            f"{name}: chain {pair} merges the adapter into W (W + sAB), which cannot apply dropout to the "
            f"adapter path only; with dropout={dropout} use one of {valid}, or chain='auto'"
        )
    return pair  # type: ignore[return-value]


class ChainDispatch:
    """Per-call planning and dispatch, shared by :class:`RunLoRALinear` and PEFT layers converted in place.

    The host module provides ``base_layer``; this mixin keeps ``runlora_info`` (the base's
    :class:`~runlora_nb.core.base.BaseInfo`), ``runlora_chain`` (mode or explicit pair) and a small dict of
    :class:`~runlora_nb.core.function.CallSpec` per call key, so the hot path is one dict lookup.
    """

    runlora_info: BaseInfo
    runlora_chain: str | tuple[str, str]

    def _init_dispatch(self, info: BaseInfo, chain: str | tuple[str, str]) -> None:
        self.runlora_info = info
        self.runlora_chain = chain
        self._runlora_specs: dict[tuple, CallSpec] = {}
        self._runlora_plans: dict[tuple, ChainPlan] = {}
        self._runlora_last_key: tuple | None = None

    def set_chain(self, chain: ChainArg | ChainPlan | Mapping) -> None:
        """Switch planner mode or pin a pair, e.g. ``layer.set_chain(("fwd1", "bwd1"))``, or a recorded plan
        (a :class:`ChainPlan` or its ``to_dict()``)."""
        self.runlora_chain = _check_chain(chain, self._runlora_max_dropout(), self._runlora_name())
        self._runlora_specs.clear()
        self._runlora_plans.clear()

    @property
    def last_plan(self) -> ChainPlan | None:
        """The plan used by the most recent call (None before the first call)."""
        return self._runlora_plans.get(self._runlora_last_key)

    def _runlora_name(self) -> str:
        return getattr(self, "name", None) or type(self).__name__

    def _runlora_max_dropout(self) -> float:
        raise NotImplementedError

    def _compute_dtypes(
        self, device_type: str, adapter_dtype: torch.dtype, input_dtype: torch.dtype | None = None
    ) -> tuple[torch.dtype, torch.dtype]:
        """(base, adapter) product dtypes: the autocast dtype for both under autocast, else the stored ones.

        A 4-bit base computes in its ``compute_dtype``; an int8 base has none and, like bitsandbytes' own int8
        matmul, computes in the input's floating dtype.
        """
        if torch.is_autocast_enabled(device_type):
            dt = torch.get_autocast_dtype(device_type)
            return dt, dt
        info = self.runlora_info
        base = info.dtype
        if info.kind == "int8" and input_dtype is not None and input_dtype.is_floating_point:
            base = input_dtype
        elif info.quantized:
            base = getattr(self.base_layer, "compute_dtype", None) or base
        return base, adapter_dtype

    def _plan(
        self, n: int, needs: Needs, base, adapter, device: torch.device, rank: int, dropout: float
    ) -> ChainPlan:
        info = self.runlora_info
        if isinstance(self.runlora_chain, tuple):
            f, b = self.runlora_chain
            i, o = info.in_features, info.out_features
            return ChainPlan(
                f,
                b,
                "explicit",
                pair_flops(f, b, n, i, o, rank, needs),
                None,
                pair_temp_bytes(f, b, n, i, o, rank, needs, base.itemsize),
                "chosen by the user",
            )
        return plan_chains(
            n,
            info.in_features,
            info.out_features,
            rank,
            needs=needs,
            dtype=base,
            adapter_dtype=adapter,
            device=device,
            dropout=dropout,
            quant=info.kind if info.quantized else "",
            mode=self.runlora_chain,
        )

    def _dispatch(
        self, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scaling: float, dropout: float
    ) -> torch.Tensor:
        """Y = X·W + s·(D(X)·A)·B (+ bias) for the host's base layer with adapters ``a`` (r, i), ``b`` (o, r)."""
        info = self.runlora_info
        if x.shape[-1] != info.in_features:
            raise ValueError(
                f"{self._runlora_name()}: input has last dimension {x.shape[-1]} (shape {tuple(x.shape)}) but the "
                f"layer expects in_features={info.in_features}; pass a (..., {info.in_features}) tensor"
            )
        grad = torch.is_grad_enabled()
        needs = Needs(grad and x.requires_grad, grad and a.requires_grad, grad and b.requires_grad)
        p = dropout if self.training else 0.0
        base_dtype, adapter_dtype = self._compute_dtypes(x.device.type, a.dtype, x.dtype)
        if not info.quantized and torch.compiler.is_compiling():  # one opaque op for Dynamo: no graph breaks
            base = self.base_layer
            return lora_linear(
                x, a, b, base.weight, getattr(base, "bias", None), chain=self.runlora_chain, scaling=scaling,
                dropout=p, conv1d=info.conv1d, base_dtype=base_dtype, adapter_dtype=adapter_dtype, needs=needs,
            )  # fmt: skip
        n = x.numel() // info.in_features
        key = (n, needs, base_dtype, adapter_dtype, x.device, p, scaling, a.shape[0])
        spec = self._runlora_specs.get(key)
        if spec is None:
            if len(self._runlora_specs) > 256:  # many distinct sequence lengths: keep the dicts small
                self._runlora_specs.clear()
                self._runlora_plans.clear()
            plan = self._plan(n, needs, base_dtype, adapter_dtype, x.device, a.shape[0], p)
            spec = self._make_spec(plan, base_dtype, adapter_dtype, scaling, p)
            self._runlora_specs[key], self._runlora_plans[key] = spec, plan
        self._runlora_last_key = key
        base = self.base_layer
        weight = None if info.quantized else base.weight
        y = lora_apply(x, a, b, weight, getattr(base, "bias", None), spec)
        return y.to(x.dtype) if info.quantized else y

    def _make_spec(self, plan: ChainPlan, base_dtype, adapter_dtype, scaling: float, p: float) -> CallSpec:
        info = self.runlora_info
        dequant = quant.dequantizer(self.base_layer, info, base_dtype) if info.quantized else None
        return CallSpec(
            FORWARD[plan.fwd], BACKWARD[plan.bwd], scaling, p, info.conv1d, base_dtype, adapter_dtype, dequant
        )


class RunLoRALinear(ChainDispatch, nn.Module):
    """Y = X·W + s·(D(X)·A)·B (+ bias) around an existing linear layer, with the cheapest valid chain pair.

    The base layer is kept as ``base_layer`` and never copied (views only); its weight and bias are frozen.
    ``lora_A`` (``nn.Linear(i, r)``, weight r×i) and ``lora_B`` (``nn.Linear(r, o)``, weight o×r) follow PEFT's
    layouts and default initialisation (kaiming-uniform A, zero B), so PEFT adapters load unchanged.

    Args:
        base_layer: ``nn.Linear``, transformers ``Conv1D`` or bitsandbytes ``Linear4bit`` / ``Linear8bitLt``.
        r: rank, > 0.
        alpha: LoRA alpha, > 0; the scaling is alpha / r (alpha / sqrt(r) with ``use_rslora``).
        dropout: adapter-path dropout probability in [0, 1); masks are regenerated in backward, never stored.
        chain: ``"auto"`` (calibrated cost model), ``"flops"``, ``"timed"``, an explicit pair such as
            ``("fwd1", "bwd5")``, or a recorded plan (:class:`ChainPlan` or its ``to_dict()``) to pin its pair.
        use_rslora: rank-stabilised scaling alpha / sqrt(r).
        adapter_dtype: dtype of ``lora_A`` / ``lora_B``; default as PEFT: fp32 on 16-bit and quantized bases.
        init_lora_weights: True (PEFT default: kaiming A, zero B), ``"gaussian"`` (A ~ N(0, 1/r)), or False
            (random A and B, the adapter is not a no-op — for tests).
        name: the layer's path in its model, used in error messages.

    Raises:
        TypeError: ``base_layer`` is not a supported linear layer.
        ValueError: r ≤ 0, alpha ≤ 0, dropout outside [0, 1), unknown chain, merged chain with dropout.
    """

    def __init__(
        self,
        base_layer: nn.Module,
        r: int = 8,
        alpha: float = 16,
        dropout: float = 0.0,
        chain: ChainArg = "auto",
        *,
        use_rslora: bool = False,
        adapter_dtype: torch.dtype | None = None,
        init_lora_weights: bool | str = True,
        name: str | None = None,
    ) -> None:
        super().__init__()
        info = describe_base(base_layer, name or "base_layer")
        self.name = name or f"RunLoRALinear({info.in_features}→{info.out_features})"
        if not isinstance(r, int) or isinstance(r, bool) or r <= 0:
            raise ValueError(
                f"{self.name}: rank r must be a positive integer, got r={r!r}; typical values: 8, 16, 64"
            )
        if not (isinstance(alpha, int | float) and alpha > 0):
            raise ValueError(
                f"{self.name}: alpha must be > 0, got alpha={alpha!r}; PEFT's usual choice is 2·r"
            )
        if not (isinstance(dropout, int | float) and 0.0 <= dropout < 1.0):
            raise ValueError(f"{self.name}: dropout must be in [0, 1), got dropout={dropout!r}")
        cap = min(info.in_features, info.out_features)
        if r > cap and (r, cap) not in _RANK_WARNED:  # once per process per (r, cap): not once per layer
            _RANK_WARNED.add((r, cap))
            warnings.warn(
                f"{self.name}: r={r} exceeds min(in_features, out_features)={cap}; the update cannot have more "
                "than that rank (PEFT allows it; it only costs memory and time). Other layers with r={r} > {cap} "
                "are not warned about again.".replace("{r}", str(r)).replace("{cap}", str(cap)),
                UserWarning,
                stacklevel=2,
            )
        checked_chain = _check_chain(chain, float(dropout), self.name)
        self.base_layer = base_layer
        self._init_dispatch(info, checked_chain)
        self.r, self.alpha, self.dropout, self.use_rslora = r, alpha, float(dropout), use_rslora
        self.scaling = alpha / math.sqrt(r) if use_rslora else alpha / r
        self.merged = False
        self.adapter_enabled = True
        for p in base_layer.parameters():
            p.requires_grad_(False)
        if info.quantized:
            quant.guard_cpu_repack(base_layer, self.name)
        ad = adapter_dtype or default_adapter_dtype(info.dtype)
        kw = {"bias": False, "dtype": ad, "device": info.device}
        self.lora_A = nn.Linear(info.in_features, r, **kw)
        self.lora_B = nn.Linear(r, info.out_features, **kw)
        self.reset_lora_parameters(init_lora_weights)

    # ------------------------------------------------------------------------------------------------ shape
    @property
    def in_features(self) -> int:
        return self.info.in_features

    @property
    def out_features(self) -> int:
        return self.info.out_features

    @property
    def weight(self) -> torch.Tensor:
        """The base layer's weight parameter (as stored: (o, i), or (i, o) for Conv1D)."""
        return self.base_layer.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return getattr(self.base_layer, "bias", None)

    def reset_lora_parameters(self, init: bool | str = True) -> None:
        """Re-initialise the adapters: True = PEFT default (kaiming-uniform A, zero B), ``"gaussian"``, or False."""
        with torch.no_grad():
            if init is True:
                nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
                nn.init.zeros_(self.lora_B.weight)
            elif init == "gaussian":
                nn.init.normal_(self.lora_A.weight, std=1 / self.r)
                nn.init.zeros_(self.lora_B.weight)
            elif init is False:
                nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
                nn.init.kaiming_uniform_(self.lora_B.weight, a=math.sqrt(5))
            else:
                raise ValueError(
                    f"{self.name}: init_lora_weights must be True, False or 'gaussian', got {init!r}"
                )
            base = self.info.dtype
            if (
                not self.info.quantized
                and base in (torch.float16, torch.bfloat16)
                and base != self.lora_A.weight.dtype
            ):
                # PEFT creates adapters in the base dtype before casting them to fp32: same values, same run
                for w in (self.lora_A.weight, self.lora_B.weight):
                    w.copy_(w.to(base))

    # ------------------------------------------------------------------------------------------------ planning
    @property
    def info(self) -> BaseInfo:
        return self.runlora_info

    @property
    def chain(self) -> str | tuple[str, str]:
        return self.runlora_chain

    def _runlora_max_dropout(self) -> float:
        return self.dropout

    def plan(
        self,
        n_tokens: int,
        needs: Needs | tuple[bool, bool, bool] | None = None,
        *,
        device: torch.device | str | None = None,
    ) -> ChainPlan:
        """The chain pair this layer would use for ``n_tokens`` rows, and why.

        Args:
            n_tokens: N = batch × sequence.
            needs: which of (dX, dA, dB) are needed; default all three.
            device: default: the weight's device.

        Returns:
            A :class:`~runlora_nb.planning.planner.ChainPlan`.
        """
        dev = torch.device(device) if device is not None else self.info.device
        base, adapter = self._compute_dtypes(dev.type, self.lora_A.weight.dtype)
        p = self.dropout if self.training else 0.0
        return self._plan(n_tokens, Needs(*(needs or (True, True, True))), base, adapter, dev, self.r, p)

    # ------------------------------------------------------------------------------------------------ forward
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged or not self.adapter_enabled:
            return self.base_layer(x)
        return self._dispatch(x, self.lora_A.weight, self.lora_B.weight, self.scaling, self.dropout)

    # ------------------------------------------------------------------------------------------------ merge
    def delta_weight(self) -> torch.Tensor:
        """s·(AB)ᵀ as (o, i) in fp32 (the update merge adds to the stored weight, transposed for Conv1D)."""
        a, b = self.lora_A.weight.float(), self.lora_B.weight.float()
        return (b @ a) * self.scaling

    @torch.no_grad()
    def _add_to_weight(self, sign: float) -> None:
        delta = self.delta_weight() * sign  # (o, i)
        if self.info.quantized:
            quant.requantize_add(self.base_layer, self.info, delta, self.name)
            return
        w = self.base_layer.weight
        w.add_((delta.t() if self.info.conv1d else delta).to(w.dtype))

    def merge(self) -> None:
        """Add s·AB into the base weight; forward then runs the base layer alone (inference)."""
        if self.merged:
            warnings.warn(f"{self.name}: already merged; nothing to do", UserWarning, stacklevel=2)
            return
        self._add_to_weight(+1.0)
        self.merged = True

    def unmerge(self) -> None:
        """Subtract s·AB from the base weight again (exact up to rounding of the base dtype)."""
        if not self.merged:
            warnings.warn(f"{self.name}: not merged; nothing to do", UserWarning, stacklevel=2)
            return
        self._add_to_weight(-1.0)
        self.merged = False

    def enable_adapter(self, enabled: bool = True) -> None:
        """Switch the adapter path on or off (off: the output is the base layer's)."""
        self.adapter_enabled = bool(enabled)

    def extra_repr(self) -> str:
        chain = self.chain if isinstance(self.chain, str) else "+".join(self.chain)
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, r={self.r}, alpha={self.alpha}, "
            f"dropout={self.dropout}, base={self.info.kind}, chain={chain}"
        )
