"""``RunLoRALinear``: a LoRA layer that picks its chain pair per call and keeps only X for backward."""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence

import torch
from torch import nn

from . import quant
from .base import BaseInfo, describe_base
from .chains import BACKWARD, FORWARD, Needs, valid_pairs
from .function import CallSpec, lora_apply
from .planner import MODES, ChainPlan, plan_chains

__all__ = ["RunLoRALinear", "default_adapter_dtype"]

ChainArg = str | Sequence[str]


def default_adapter_dtype(base_dtype: torch.dtype) -> torch.dtype:
    """PEFT's default: fp32 adapters on fp16 / bf16 (and quantized) bases, the base dtype otherwise."""
    return base_dtype if base_dtype in (torch.float32, torch.float64) else torch.float32


def _check_chain(chain: ChainArg, dropout: float, name: str) -> str | tuple[str, str]:
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


class RunLoRALinear(nn.Module):
    """Y = X·W + s·(D(X)·A)·B (+ bias) around an existing linear layer, with the cheapest valid chain pair.

    The base layer is kept as ``base_layer`` and never copied (views only); its weight and bias are frozen.
    ``lora_A`` (``nn.Linear(i, r)``, weight r×i) and ``lora_B`` (``nn.Linear(r, o)``, weight o×r) follow PEFT's
    layouts and default initialisation (kaiming-uniform A, zero B), so PEFT adapters load unchanged.

    Args:
        base_layer: ``nn.Linear``, transformers ``Conv1D`` or bitsandbytes ``Linear4bit`` / ``Linear8bitLt``.
        r: rank, > 0.
        alpha: LoRA alpha, > 0; the scaling is alpha / r (alpha / sqrt(r) with ``use_rslora``).
        dropout: adapter-path dropout probability in [0, 1); masks are regenerated in backward, never stored.
        chain: ``"auto"`` (calibrated cost model), ``"flops"``, ``"timed"``, or an explicit pair such as
            ``("fwd1", "bwd5")``.
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
        if r > min(info.in_features, info.out_features):
            warnings.warn(
                f"{self.name}: r={r} exceeds min(in_features, out_features)={min(info.in_features, info.out_features)}; "
                "the update cannot have more than that rank (PEFT allows it; it only costs memory and time).",
                UserWarning,
                stacklevel=2,
            )
        self.chain = _check_chain(chain, float(dropout), self.name)
        self.base_layer = base_layer
        self.info: BaseInfo = info
        self.r, self.alpha, self.dropout, self.use_rslora = r, alpha, float(dropout), use_rslora
        self.scaling = alpha / math.sqrt(r) if use_rslora else alpha / r
        self.merged = False
        self.adapter_enabled = True
        for p in base_layer.parameters():
            p.requires_grad_(False)
        if info.quantized:
            quant.guard_cpu_repack(base_layer)
        ad = adapter_dtype or default_adapter_dtype(info.dtype)
        kw = {"bias": False, "dtype": ad, "device": info.device}
        self.lora_A = nn.Linear(info.in_features, r, **kw)
        self.lora_B = nn.Linear(r, info.out_features, **kw)
        self.reset_lora_parameters(init_lora_weights)
        self._specs: dict[tuple, CallSpec] = {}

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

    # ------------------------------------------------------------------------------------------------ planning
    def _dtypes(self, device_type: str) -> tuple[torch.dtype, torch.dtype]:
        if torch.is_autocast_enabled(device_type):
            dt = torch.get_autocast_dtype(device_type)
            return dt, dt
        base = self.info.dtype
        if self.info.quantized:
            base = getattr(self.base_layer, "compute_dtype", None) or base
        return base, self.lora_A.weight.dtype

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
            needs: which of (dX, dA, dB) are needed; default: all three when training, as the first call sees.
            device: default: the weight's device.

        Returns:
            A :class:`~runlora_nb.planner.ChainPlan`.
        """
        dev = torch.device(device) if device is not None else self.info.device
        base, adapter = self._dtypes(dev.type)
        p = self.dropout if self.training else 0.0
        return self._plan(n_tokens, Needs(*(needs or (True, True, True))), base, adapter, dev, p)

    def _plan(self, n: int, needs: Needs, base, adapter, device: torch.device, dropout: float) -> ChainPlan:
        if isinstance(self.chain, tuple):
            from .chains import pair_flops, pair_temp_bytes

            f, b = self.chain
            i, o, r = self.in_features, self.out_features, self.r
            return ChainPlan(
                f,
                b,
                "explicit",
                pair_flops(f, b, n, i, o, r, needs),
                None,
                pair_temp_bytes(f, b, n, i, o, r, needs, base.itemsize),
                "chosen by the user",
            )
        return plan_chains(
            n,
            self.in_features,
            self.out_features,
            self.r,
            needs=needs,
            dtype=base,
            adapter_dtype=adapter,
            device=device,
            dropout=dropout,
            quant=self.info.kind if self.info.quantized else "",
            mode=self.chain,
        )

    def _spec(self, n: int, needs: Needs, device: torch.device) -> CallSpec:
        base, adapter = self._dtypes(device.type)
        key = (n, needs, base, adapter, device.type, self.training)
        spec = self._specs.get(key)
        if spec is None:
            p = self.dropout if self.training else 0.0
            plan = self._plan(n, needs, base, adapter, device, p)
            dequant = quant.dequantizer(self.base_layer, self.info, base) if self.info.quantized else None
            spec = CallSpec(
                FORWARD[plan.fwd],
                BACKWARD[plan.bwd],
                self.scaling,
                p,
                self.info.conv1d,
                base,
                adapter,
                dequant,
            )
            if len(self._specs) > 256:  # many distinct sequence lengths: keep the dict small
                self._specs.clear()
            self._specs[key] = spec
        return spec

    # ------------------------------------------------------------------------------------------------ forward
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged or not self.adapter_enabled:
            return self.base_layer(x)
        if x.shape[-1] != self.in_features:
            raise ValueError(
                f"{self.name}: input has last dimension {x.shape[-1]} (shape {tuple(x.shape)}) but the layer "
                f"expects in_features={self.in_features}; pass a (..., {self.in_features}) tensor"
            )
        grad = torch.is_grad_enabled()
        needs = Needs(
            grad and x.requires_grad,
            grad and self.lora_A.weight.requires_grad,
            grad and self.lora_B.weight.requires_grad,
        )
        n = x.numel() // self.in_features if self.in_features else 0
        spec = self._spec(n, needs, x.device)
        weight = None if self.info.quantized else self.base_layer.weight
        y = lora_apply(x, self.lora_A.weight, self.lora_B.weight, weight, self.bias, spec)
        return y.to(x.dtype) if self.info.quantized else y

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
            self._specs.clear()  # the dequantizer closes over the old weight object
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
