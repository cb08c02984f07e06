"""The headless main job (``runlora-nb demo``): race the chains, fine-tune, write an HTML report.

1. Race every chain pair, the planner, PEFT and the frozen floor on one layer of the model (its q_proj shape
   at the fine-tuning batch), and a whole training step without adapters / with PEFT / with runlora_nb.
2. Fine-tune SmolLM2-135M (``--fast``: tiny-llama) with runlora_nb on the embedded sonnets, with samples
   before and after.
3. The PoC checks: evaluation of the base (adapters off) against the tuned model on the validation split, the
   memory ledger's prediction next to its measurement, and a merged export reloaded and checked for parity.
4. Print the tables and write ``report.html`` (plotly charts, tables, samples) plus CSVs.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from ..assess.evaluate import compare_adapters
from ..assess.export import export_model
from ..assets.zoo import load_model
from ..ledger.recorded import recorded_tuner
from ..measure import LayerSpec, race_layer, race_model
from ..measure.memory_ledger import MemoryLedger
from ..train import FineTuneConfig, PrintProgress
from .report import layer_race_figure, loss_figure, memory_figure, model_race_figure, write_report
from .tables import format_layer_table

__all__ = ["DemoPlan", "run_demo"]


@dataclass(frozen=True)
class DemoPlan:
    """Sizes of a demo run."""

    model: str
    steps: int
    batch_size: int
    seq_len: int
    r: int
    lr: float
    race_reps: int
    layer: LayerSpec


def _plan(fast: bool, steps: int | None) -> DemoPlan:
    if fast:
        return DemoPlan(
            "tiny-llama",
            20 if steps is None else steps,
            8,
            64,
            8,
            3e-3,
            3,
            LayerSpec(512, 128, 128, 8, dropout=0.05),
        )
    return DemoPlan(
        "smollm2-135m",
        40 if steps is None else steps,
        4,
        128,
        8,
        1e-3,
        5,
        LayerSpec(512, 576, 576, 8, dropout=0.05),
    )


def run_demo(out_dir: str | Path = "artifacts", fast: bool = False, steps: int | None = None) -> Path:
    """Run the demo and return the report path.

    Args:
        out_dir: folder for report.html, the CSVs and the adapter.
        fast: tiny-llama and a few steps (seconds) instead of SmolLM2-135M (a few minutes on 2 cores).
        steps: fine-tuning steps (default 40, or 20 with ``fast``).

    Returns:
        Path of ``report.html``.

    Raises:
        ValueError: ``steps`` is not a positive integer, or ``out_dir`` is an existing file (both checked
            before anything runs).
    """
    if steps is not None and (isinstance(steps, bool) or not isinstance(steps, int) or steps < 1):
        raise ValueError(
            f"run_demo: steps must be a positive integer (or None for the default), got {steps!r}"
        )
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ValueError(
            f"run_demo: out_dir {out} exists and is not a folder; pass a folder (new or existing)"
        )
    out.mkdir(parents=True, exist_ok=True)
    plan = _plan(fast, steps)
    t0 = time.perf_counter()

    print(f"== 1/3 chain race on one layer: {plan.layer.label()}")
    layer_df = race_layer(plan.layer, reps=plan.race_reps)
    print(format_layer_table(layer_df))
    layer_df.to_csv(out / "race_layer.csv", index=False)

    print(f"== 2/3 training-step race on {plan.model} (batch {plan.batch_size} × {plan.seq_len})")
    model_race = race_model(
        plan.model, batch=plan.batch_size, seq=plan.seq_len, r=plan.r, dropout=0.05, reps=plan.race_reps
    )
    print(
        model_race.times[["candidate", "median_s", "ratio_base", "ratio_peft", "saved_over_peft"]].to_string(
            index=False
        )
    )
    model_race.times.to_csv(out / "race_model.csv", index=False)
    model_race.plans.to_csv(out / "plans.csv", index=False)

    print(f"== 3/3 fine-tune {plan.model} with runlora_nb for {plan.steps} steps")
    cfg = FineTuneConfig(
        model=plan.model,
        dataset="sonnets",
        r=plan.r,
        alpha=2 * plan.r,
        dropout=0.05,
        lr=plan.lr,
        steps=plan.steps,
        batch_size=plan.batch_size,
        seq_len=plan.seq_len,
        eval_interval=max(plan.steps // 4, 1),
        output_dir=str(out / "adapter"),
    )
    tuner = recorded_tuner(cfg, [PrintProgress(every=max(plan.steps // 8, 1))])
    result = tuner.run()
    losses, evals = result.losses(), result.eval_table()
    losses.to_csv(out / "losses.csv", index=False)
    samples = pd.DataFrame([{"stage": s.stage, "prompt": s.prompt, "text": s.text} for s in result.samples])
    first, last = result.evals[0], result.evals[-1]
    summary = (
        f"model {plan.model}; {plan.steps} steps × {cfg.tokens_per_step} tokens; "
        f"validation loss {first.val_loss:.3f} → {last.val_loss:.3f} (perplexity {first.perplexity:.1f} → "
        f"{last.perplexity:.1f}); {result.tokens_per_s:,.0f} tokens/s; adapter saved to {result.end.adapter_dir}; "
        f"total demo time {time.perf_counter() - t0:.0f} s"
    )
    print(summary)
    print("== PoC checks: evaluation, memory ledger, export parity")
    poc = poc_sections(tuner, plan, out)
    report = write_report(
        out / "report.html",
        f"runlora_nb demo — {plan.model}",
        [
            ("Summary", summary),
            (f"Chain race: {plan.layer.label()}", layer_race_figure(layer_df)),
            ("Activation memory per candidate", memory_figure(layer_df)),
            (
                "Layer race table",
                layer_df[
                    [
                        "candidate",
                        "fwd",
                        "bwd",
                        "median_s",
                        "iqr_s",
                        "ratio_frozen",
                        "ratio_peft",
                        "saved_bytes",
                    ]
                ],
            ),
            ("Training step race", model_race_figure(model_race.times)),
            ("Training step table", model_race.times),
            ("Fine-tuning loss", loss_figure({"runlora_nb": (losses, evals)})),
            ("Samples before / after", samples),
            ("Chain plan per module", model_race.plans),
            *poc,
        ],
    )
    print(f"wrote {report}")
    return report


def poc_sections(tuner, plan: DemoPlan, out: Path) -> list[tuple[str, str | pd.DataFrame]]:
    """The PoC report's checks of a finished run, as report sections (and CSV / JSON files in ``out``).

    - **Evaluation**: token-weighted loss and perplexity of the base (adapters switched off) and the tuned model
      on the validation split (:func:`~runlora_nb.assess.evaluate.compare_adapters`).
    - **Memory**: the memory ledger's prediction next to one real step's measurement, PEFT and runlora_nb
      (:meth:`~runlora_nb.measure.memory_ledger.MemoryLedger.compare`).
    - **Export parity**: the tuned model merged, saved, reloaded and compared on the parity prompts
      (:func:`~runlora_nb.assess.export.export_model`); a failed check is reported, not hidden.
    """
    cfg = tuner.config
    evaluation = compare_adapters(tuner.model, tuner.val_set, cfg.batch_size, max_batches=cfg.eval_batches)
    evaluation.to_csv(out / "evaluation.csv", index=False)
    base, _ = load_model(cfg.model, dtype=cfg.dtype)
    ledger = MemoryLedger(base, r=cfg.r, alpha=cfg.alpha, dropout=cfg.dropout)
    memory = ledger.compare(cfg.batch_size, cfg.seq_len)
    memory.to_csv(out / "memory.csv", index=False)
    exported = export_model(tuner.model, tuner.tokenizer, out / "export-merged", "merged", force=True)
    parity = {k: v for k, v in exported.parity.items() if not isinstance(v, list | dict)}
    table = pd.DataFrame([{"check": k, "value": v} for k, v in parity.items()])
    (out / "parity.json").write_text(json.dumps(exported.parity, indent=2, default=str), encoding="utf-8")
    verdict = (
        "passed" if exported.parity.get("ok") else f"FAILED: {', '.join(exported.parity.get('failed', []))}"
    )
    mib = 2.0**20
    memory_cols = ["backend", "activation_bytes_predicted", "activation_bytes_measured", "ratio",
                   "step_bytes_predicted", "step_bytes_measured", "step_ratio", "total_bytes"]  # fmt: skip
    shown = memory[memory_cols].copy()
    for col in [
        c for c in memory_cols if c.endswith("bytes") or c.endswith("_predicted") or c.endswith("_measured")
    ]:
        shown[col] = (shown[col] / mib).round(2)
    shown = shown.rename(columns={c: c.replace("bytes", "MiB") for c in memory_cols})
    return [
        ("Evaluation: base (adapters off) vs tuned, validation split", evaluation),
        ("Memory ledger: predicted vs measured (MiB; total is a lower bound of the peak)", shown),
        (f"Export parity (merged, {exported.path.name}): {verdict}", table),
    ]
