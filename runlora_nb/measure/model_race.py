"""Whole-model races: one training step with no adapters, with PEFT and with runlora_nb, in one process."""

from __future__ import annotations

import copy
import math
import statistics
from collections.abc import Callable
from dataclasses import dataclass

import pandas as pd
import torch
from torch import nn

from ..core.memory import SavedTensorRecorder
from ..integrations.plans import plan_table
from ..planning.timing import Cancelled, interleaved
from .layer_race import Candidate, measurement_of
from .spec import Measurement, dtype_name

__all__ = ["MODEL_COLUMNS", "ModelRace", "adapter_variants", "load_for_race", "race_model", "random_batch"]


@dataclass
class ModelRace:
    """Result of :func:`race_model`.

    Attributes:
        times: one row per candidate ("no adapters", "peft", "runlora"): median_s, iqr_s, ratio_base,
            ratio_peft, saved_bytes, saved_over_peft, tokens_per_s, reps, and the setting.
        plans: the runlora model's per-module chain plans (see :func:`runlora_nb.integrations.plans.plan_table`).
    """

    times: pd.DataFrame
    plans: pd.DataFrame


MODEL_COLUMNS = [
    "candidate",
    "median_s",
    "iqr_s",
    "ratio_base",
    "ratio_peft",
    "saved_bytes",
    "saved_over_peft",
    "peak_bytes",
    "tokens_per_s",
    "reps",
    "model",
    "batch",
    "seq",
    "rank",
    "dropout",
    "dtype",
]


def load_for_race(model: str | nn.Module, dtype: str) -> nn.Module:
    if isinstance(model, nn.Module):
        return model
    from ..assets.zoo import load_model

    loaded, _ = load_model(model, dtype=dtype)
    return loaded


def random_batch(model: nn.Module, batch: int, seq: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """Token ids (batch, seq) drawn from the model's vocabulary, with labels = input_ids."""
    vocab = int(getattr(getattr(model, "config", None), "vocab_size", 256))
    ids = torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(seed))
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}


def adapter_variants(
    model: nn.Module,
    *,
    r: int,
    alpha: float,
    dropout: float,
    target_modules,
    mode: str = "auto",
    backends: tuple[str, ...] = ("base", "peft", "runlora"),
) -> dict[str, nn.Module]:
    """Independent copies of ``model``: frozen without adapters ("base", inputs require grad so backward
    reaches every layer, the floor of any LoRA step), with PEFT LoRA, and with RunLoRA — same init seed."""
    import peft

    from ..integrations.inject import apply_runlora, get_peft_model

    out: dict[str, nn.Module] = {}
    for name in backends:
        m = copy.deepcopy(model).train()
        for p in m.parameters():
            p.requires_grad_(False)
        if name == "base":
            m.enable_input_require_grads()
        elif name == "peft":
            torch.manual_seed(0)
            cfg = peft.LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=target_modules)
            m = get_peft_model(m, cfg).train()
        else:
            torch.manual_seed(0)
            m = apply_runlora(
                m, r=r, alpha=alpha, dropout=dropout, target_modules=target_modules, chain=mode
            ).train()
        out[name] = m
    return out


def _model_step(model: nn.Module, batch: dict[str, torch.Tensor]) -> Callable[[], None]:
    params = [p for p in model.parameters() if p.requires_grad]

    def step() -> None:
        model(**batch).loss.backward()
        for p in params:
            p.grad = None

    return step


def race_model(
    model: str | nn.Module = "llama-135m-shapes",
    *,
    batch: int = 4,
    seq: int = 256,
    r: int = 16,
    alpha: float | None = None,
    dropout: float = 0.05,
    dtype: str = "fp32",
    target_modules="all-linear",
    mode: str = "auto",
    reps: int = 5,
    warmup: int = 1,
    on_measurement: Callable[[Measurement], None] | None = None,
    on_round: Callable[[int], None] | None = None,
    cancel: Callable[[], bool] | None = None,
    shuffle_seed: int | None = 0,
    device: str = "cpu",
    compile: bool = False,
) -> ModelRace:
    """Time a whole training step (forward + backward) without adapters, with PEFT and with runlora_nb.

    Args:
        model: zoo name or a model (left untouched: each candidate gets its own copy).
        batch: sequences per step.
        seq: tokens per sequence.
        r: rank on every targeted layer.
        alpha: LoRA alpha (default 2·r).
        dropout: adapter dropout.
        dtype: base dtype when loading by name.
        target_modules: ``"all-linear"`` or names.
        mode: runlora planner mode.
        reps: interleaved timed rounds.
        warmup: untimed rounds.
        on_measurement: called per candidate after each round.
        on_round: called with the round index between rounds, outside every timing (a chart draws here).
        shuffle_seed: seed of the per-round candidate order; ``None`` keeps a fixed order.
        cancel: polled between steps; stops early (``times.attrs["cancelled"]``).
        device: ``"cpu"`` or a CUDA device (each candidate's copy and the batch move there; CUDA is
            synchronised around every timed step and ``peak_bytes`` is the allocator's peak of one step).
        compile: also race a ``torch.compile``-d copy of each candidate ("no adapters compiled", "peft compiled",
            "runlora compiled"; compiled in the untimed warm-up, so ``warmup`` must be >= 1). Their saved bytes
            are not recorded (NaN): saved-tensor hooks do not see inside a compiled graph.

    Returns:
        A :class:`ModelRace`.

    Raises:
        ValueError: a CUDA device on a machine (or torch build) without CUDA.
    """
    if torch.device(device).type == "cuda" and not torch.cuda.is_available():
        raise ValueError(
            f"race_model: device {device!r} asked for, but this torch build sees no CUDA device "
            f"(torch {torch.__version__}); use device='cpu'"
        )
    if compile and warmup < 1:
        raise ValueError("race_model: compile=True compiles in the warm-up; use warmup >= 1")
    if min(batch, seq, r, reps) < 1 or warmup < 0:
        raise ValueError(
            f"race_model: batch, seq, r and reps must be >= 1 and warmup >= 0, got batch={batch}, seq={seq}, "
            f"r={r}, reps={reps}, warmup={warmup}"
        )
    base_model = load_for_race(model, dtype_name(dtype))
    name = model if isinstance(model, str) else type(model).__name__
    config = getattr(base_model, "config", None)
    if config is not None:
        from ..assets.loading import check_positions

        check_positions(config, seq, repr(name), "race_model")
    alpha = 2 * r if alpha is None else alpha
    variants = adapter_variants(
        base_model, r=r, alpha=alpha, dropout=dropout, target_modules=target_modules, mode=mode
    )
    data = {k: v.to(device) for k, v in random_batch(base_model, batch, seq).items()}
    for m in variants.values():
        m.to(device)
    cuda = torch.device(device).type == "cuda"
    labels = {"base": "no adapters", "peft": "peft", "runlora": "runlora"}
    kinds = {"base": "floor", "peft": "peft", "runlora": "plan"}
    cands, peak = {}, {}
    with torch.random.fork_rng(devices=[]):
        for key, m in variants.items():
            if cuda:
                torch.cuda.synchronize(device)
                torch.cuda.reset_peak_memory_stats(device)
            with SavedTensorRecorder(m) as rec:
                loss = m(**data).loss
            loss.backward()
            peak[labels[key]] = torch.cuda.max_memory_allocated(device) if cuda else None
            cands[labels[key]] = Candidate(labels[key], kinds[key], m, saved_bytes=rec.activation_bytes())
        if compile:
            for key, m in variants.items():
                name_c = labels[key] + " compiled"
                cands[name_c] = Candidate(name_c, kinds[key], torch.compile(m), saved_bytes=-1)
        steps = {c.name: _model_step(c.module, data) for c in cands.values()}
        collected: dict[str, list[float]] = {}

        def keep(k: int, samples: dict[str, list[float]]) -> None:
            for cname, ts in samples.items():
                collected[cname] = list(ts)
                if on_measurement is not None:
                    on_measurement(measurement_of(cands[cname], ts, final=(k == reps - 1)))
            if on_round is not None:
                on_round(k)

        cancelled = False
        try:
            interleaved(
                steps,
                warmup=warmup,
                reps=reps,
                cancel=cancel,
                on_round=keep,
                shuffle_seed=shuffle_seed,
                device=device,
            )
        except Cancelled:
            cancelled = True
    med = {c: statistics.median(ts) for c, ts in collected.items() if ts}
    base_t, peft_t = med.get("no adapters", math.nan), med.get("peft", math.nan)
    peft_saved = cands["peft"].saved_bytes
    rows = [
        {
            "candidate": c.name,
            "median_s": med.get(c.name, math.nan),
            "iqr_s": measurement_of(c, collected.get(c.name, []), True).iqr,
            "ratio_base": med.get(c.name, math.nan) / base_t,
            "ratio_peft": med.get(c.name, math.nan) / peft_t,
            "saved_bytes": c.saved_bytes if c.saved_bytes >= 0 else math.nan,
            "saved_over_peft": c.saved_bytes / peft_saved if peft_saved and c.saved_bytes >= 0 else math.nan,
            "peak_bytes": peak.get(c.name),
            "tokens_per_s": batch * seq / med.get(c.name, math.nan),
            "reps": len(collected.get(c.name, [])),
            "model": name,
            "batch": batch,
            "seq": seq,
            "rank": r,
            "dropout": dropout,
            "dtype": dtype_name(dtype),
        }
        for c in cands.values()
    ]
    times = pd.DataFrame(rows, columns=MODEL_COLUMNS)
    times.attrs["cancelled"] = cancelled
    return ModelRace(times, plan_table(variants["runlora"]))
