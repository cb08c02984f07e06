"""``runlora-nb``: benchmarks, plans, the model zoo and the headless demo from a shell.

Examples:
    runlora-nb bench layer --tokens 2048 --in 1024 --out 1024 --rank 16 --dtype bf16 --dropout 0.1
    runlora-nb bench grid --csv artifacts/grid.csv
    runlora-nb bench model --model llama-135m-shapes --batch 4 --seq 256 --rank 16 --dropout 0.05
    runlora-nb plan --tokens 4096 --in 768 --out 768 --rank 8
    runlora-nb demo --fast
    runlora-nb train --model tiny-llama --steps 40 [--resume ID];  runlora-nb runs list|show|compare|rm
    runlora-nb sweep --model tiny-llama --r 4,8 --lr 1e-3,3e-3 --steps 20 --trials 4 --study NAME
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path

import pandas as pd

from . import poc_cli, runs_cli
from .argtypes import CleanParser, device, dropout, needs, nonneg_int, positive_int
from .tables import format_layer_table

__all__ = ["format_layer_table", "main"]


def _add_layer_args(
    p: argparse.ArgumentParser, mode_default: str | None = "auto", mode_help: str = "default auto"
) -> None:
    p.add_argument(
        "--tokens", "-N", type=positive_int, default=2048, help="N = batch × sequence (default 2048)"
    )
    p.add_argument(
        "--in", dest="in_features", type=positive_int, default=1024, help="in_features i (default 1024)"
    )
    p.add_argument(
        "--out", dest="out_features", type=positive_int, default=1024, help="out_features o (default 1024)"
    )
    p.add_argument("--rank", "-r", type=positive_int, default=16, help="LoRA rank (default 16)")
    p.add_argument("--dtype", default="fp32", help="base dtype: fp32, bf16, fp16 (default fp32)")
    p.add_argument("--adapter-dtype", default=None, help="adapter dtype (default: same as --dtype)")
    p.add_argument("--dropout", type=dropout, default=0.0, help="adapter dropout (default 0)")
    p.add_argument(
        "--quant", default="", choices=["", "nf4", "fp4", "int8"], help="quantized base (bitsandbytes)"
    )
    p.add_argument("--device", type=device, default="cpu", help="cpu or cuda")
    p.add_argument(
        "--mode", default=mode_default, choices=["auto", "flops", "timed"], help=f"planner mode ({mode_help})"
    )


def _add_output_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--reps", type=positive_int, default=7, help="timed rounds (default 7)")
    p.add_argument("--warmup", type=nonneg_int, default=1, help="untimed rounds first (default 1)")
    p.add_argument("--csv", type=Path, help="also write the tidy table as CSV")
    p.add_argument("--json", type=Path, help="also write the tidy table as JSON records")


def _parser() -> argparse.ArgumentParser:
    parser = CleanParser(prog="runlora-nb", description="RunLoRA: faster and lighter LoRA, measured.")
    sub = parser.add_subparsers(dest="command", required=True)
    from . import sweep_cli

    sweep_cli.add_parser(sub)

    bench = sub.add_parser("bench", help="race chains, PEFT and the frozen floor").add_subparsers(
        dest="what", required=True
    )
    layer = bench.add_parser("layer", help="one layer: every valid chain pair, the planner, PEFT, frozen")
    _add_layer_args(layer)
    layer.add_argument("--bias", action="store_true", help="base layer with bias")
    layer.add_argument("--no-x-grad", action="store_true", help="input needs no gradient (first layer)")
    layer.add_argument("--no-pairs", action="store_true", help="only frozen, PEFT and the planner's choice")
    _add_output_args(layer)

    grid = bench.add_parser("grid", help="the issue-3 grid of layer shapes, with the targets checked")
    grid.add_argument("--dtypes", default="fp32,bf16", help="comma list (default fp32,bf16)")
    grid.add_argument("--dropouts", default="0,0.1", help="comma list (default 0,0.1)")
    grid.add_argument("--mode", default="auto", choices=["auto", "flops", "timed"])
    grid.add_argument("--device", type=device, default="cpu", help="cpu or cuda")
    _add_output_args(grid)

    model = bench.add_parser("model", help="a whole model's training step: no adapters vs PEFT vs runlora_nb")
    model.add_argument("--model", default="llama-135m-shapes", help="zoo name or local folder")
    model.add_argument("--batch", type=positive_int, default=4)
    model.add_argument("--seq", type=positive_int, default=256)
    model.add_argument("--rank", "-r", type=positive_int, default=16)
    model.add_argument("--alpha", type=float, default=None, help="default 2·rank")
    model.add_argument("--dropout", type=dropout, default=0.05)
    model.add_argument("--dtype", default="fp32")
    model.add_argument("--targets", default="all-linear", help="'all-linear' or comma list of names")
    model.add_argument("--mode", default="auto", choices=["auto", "flops", "timed"])
    model.add_argument("--plans", type=Path, help="write the per-module plan table as CSV")
    model.add_argument("--device", type=device, default="cpu", help="cpu or cuda")
    model.add_argument(
        "--compile", action="store_true", help="also race torch.compile-d copies (compiled in the warm-up)"
    )
    _add_output_args(model)

    plan = sub.add_parser("plan", help="which chain pair each planner mode picks for a shape, and why")
    _add_layer_args(plan, None, "default: show all three")
    plan.add_argument("--needs", type=needs, default="dx,da,db", help="gradients needed (default dX,dA,dB)")
    plan.add_argument("--recalibrate", action="store_true", help="measure this machine's cost model again")

    sub.add_parser("models", help="list the offline model zoo")
    fetch = sub.add_parser("fetch", help="download/convert a zoo model into the cache (for offline use)")
    fetch.add_argument("name")
    fetch.add_argument("--force", action="store_true", help="download/convert again even when cached")

    demo = sub.add_parser("demo", help="headless main job: race, fine-tune, write an HTML report")
    demo.add_argument("--fast", action="store_true", help="tiny-llama instead of SmolLM2-135M, few steps")
    demo.add_argument(
        "--out", type=Path, default=Path("artifacts"), help="report folder (default artifacts/)"
    )
    demo.add_argument(
        "--steps", type=positive_int, default=None, help="fine-tuning steps (default 40, --fast 20)"
    )
    runs_cli.add_parsers(sub)
    poc_cli.add_parsers(sub)
    return parser


# ---------------------------------------------------------------------------------------------------- printing


def _write(df: pd.DataFrame, args: argparse.Namespace) -> None:
    if getattr(args, "csv", None):
        args.csv.parent.mkdir(parents=True, exist_ok=True)
        df.to_csv(args.csv, index=False)
        print(f"wrote {args.csv}")
    if getattr(args, "json", None):
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(df.to_json(orient="records", indent=1))
        print(f"wrote {args.json}")


def _machine() -> str:
    import platform

    import torch

    return f"torch {torch.__version__}, {torch.get_num_threads()} threads, {platform.machine()} {platform.system()}"


# ---------------------------------------------------------------------------------------------------- commands


def _bench_layer(args: argparse.Namespace) -> int:
    from ..measure import LayerSpec, race_layer

    spec = LayerSpec(
        args.tokens,
        args.in_features,
        args.out_features,
        args.rank,
        dtype=args.dtype,
        adapter_dtype=args.adapter_dtype,
        dropout=args.dropout,
        quant=args.quant,
        bias=args.bias,
        device=args.device,
        x_requires_grad=not args.no_x_grad,
        mode=args.mode,
    )
    print(f"race: {spec.label()} — {args.reps} interleaved rounds after {args.warmup} warm-up; {_machine()}")
    df = race_layer(spec, reps=args.reps, warmup=args.warmup, include_pairs=not args.no_pairs)
    print(format_layer_table(df))
    plan = df[df.kind == "plan"].iloc[0]
    print(f"planner ({args.mode}) chose {plan.fwd}+{plan.bwd}")
    _write(df, args)
    return 0


def _bench_grid(args: argparse.Namespace) -> int:
    from ..measure import SPEC_COLUMNS, check_targets, geomean, grid_specs, race_grid
    from ..measure import dtype_name as norm

    specs = grid_specs(
        dtypes=[norm(d) for d in args.dtypes.split(",")],
        dropouts=[float(p) for p in args.dropouts.split(",")],
        mode=args.mode,
        device=args.device,
    )
    print(f"grid: {len(specs)} rows, {args.reps} interleaved rounds each; {_machine()}")

    def progress(k, spec):
        print(f"[{k + 1}/{len(specs)}] {spec.label()}", flush=True)

    df = race_grid(specs, reps=args.reps, warmup=args.warmup, progress=progress)
    summary = check_targets(df)
    cols = [
        *[c for c in SPEC_COLUMNS if c != "quant"],
        "plan",
        "plan_over_frozen",
        "plan_over_peft",
        "best_pair",
        "pair_over_best",
        "twin_spread",
        "saved_over_x",
        "peft_saved_over_x",
    ]
    print(summary[cols].to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    for note in df.attrs.get("notes", ()):
        print(f"NOTE: {note}")
    for p, g in summary.groupby("dropout"):
        print(
            f"dropout {p}: geomean plan/PEFT {geomean(g.plan_over_peft):.3f}; plan/frozen max "
            f"{g.plan_over_frozen.max():.3f}; rows within 5% of best {g.ok_best.mean():.0%}; "
            f"saved/X max {g.saved_over_x.max():.3f}"
        )
    _write(df, args)
    return 0


def _bench_model(args: argparse.Namespace) -> int:
    from ..measure import race_model

    targets = args.targets if args.targets == "all-linear" else args.targets.split(",")
    print(
        f"model race: {args.model}, batch {args.batch} × seq {args.seq}, r={args.rank}, dropout {args.dropout}, "
        f"{args.dtype}, targets {args.targets}; {_machine()}"
    )
    result = race_model(
        args.model,
        batch=args.batch,
        seq=args.seq,
        r=args.rank,
        alpha=args.alpha,
        dropout=args.dropout,
        dtype=args.dtype,
        target_modules=targets,
        mode=args.mode,
        reps=args.reps,
        warmup=args.warmup,
        device=args.device,
        compile=args.compile,
    )
    table = result.times
    show = pd.DataFrame(
        {
            "candidate": table.candidate,
            "median ms": table.median_s * 1e3,
            "IQR ms": table.iqr_s * 1e3,
            "×no-adapters": table.ratio_base,
            "×PEFT": table.ratio_peft,
            "saved MiB": table.saved_bytes / 2**20,
            "saved/PEFT": table.saved_over_peft,
            "tokens/s": table.tokens_per_s,
        }
    )
    print(show.to_string(index=False, float_format=lambda v: f"{v:.3g}"))
    counts = result.plans.groupby(["fwd", "bwd"]).size().rename("modules").reset_index()
    print("chain pairs chosen per module:\n" + counts.to_string(index=False))
    if args.plans:
        args.plans.parent.mkdir(parents=True, exist_ok=True)
        result.plans.to_csv(args.plans, index=False)
        print(f"wrote {args.plans}")
    _write(table, args)
    return 0


def _plan(args: argparse.Namespace) -> int:
    import torch

    from ..core.chains import Needs
    from ..measure import dtype_name
    from ..planning.planner import plan_chains

    if args.recalibrate:
        from ..planning.costmodel import recalibrate
        from ..planning.planner import clear_cache

        recalibrate()
        clear_cache(disk=True)
    wanted = {s.strip().lower() for s in args.needs.split(",") if s.strip()}
    needs = Needs("dx" in wanted, "da" in wanted, "db" in wanted)
    dtype = getattr(torch, dtype_name(args.dtype))
    adapter = getattr(torch, dtype_name(args.adapter_dtype)) if args.adapter_dtype else dtype
    shape = (args.tokens, args.in_features, args.out_features, args.rank)
    print(
        f"N={shape[0]} i={shape[1]} o={shape[2]} r={shape[3]} {dtype} dropout={args.dropout} needs={needs.label()}"
    )
    for mode in (args.mode,) if args.mode else ("flops", "auto", "timed"):  # flops: formulas only
        plan = plan_chains(
            *shape,
            needs=needs,
            dtype=dtype,
            adapter_dtype=adapter,
            device=args.device,
            dropout=args.dropout,
            quant=args.quant,
            mode=mode,
        )
        print(f"  {mode:6s} {plan}")
    return 0


def _models(_args: argparse.Namespace) -> int:
    from ..assets.zoo import list_models

    print(list_models().to_string(index=False))
    return 0


def _fetch(args: argparse.Namespace) -> int:
    from ..assets.zoo import cache_problem, fetch

    if not args.force and cache_problem(args.name) is None:
        print(f"{args.name} already cached (files verified) at {fetch(args.name)}; --force rebuilds it")
        return 0
    path = fetch(args.name, force=args.force)
    print(f"{args.name} cached at {path}")
    return 0


def _demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    report = run_demo(out_dir=args.out, fast=args.fast, steps=args.steps)
    print(f"report: {report}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``runlora-nb`` command; returns the exit status."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        args = _parser().parse_args(argv)
    except SystemExit as exc:  # --help (0) or a bad argument (2, already printed as one line)
        return exc.code if isinstance(exc.code, int) else 2
    from .sweep_cli import handlers as sweep_handlers

    handlers = {
        **sweep_handlers(),
        ("bench", "layer"): _bench_layer,
        ("bench", "grid"): _bench_grid,
        ("bench", "model"): _bench_model,
        **runs_cli.handlers(),
        **poc_cli.handlers(),
    }
    key = (args.command, getattr(args, "what", None))
    handler = (
        handlers.get(key) or {"plan": _plan, "models": _models, "fetch": _fetch, "demo": _demo}[args.command]
    )
    try:
        return handler(args)
    except (ValueError, TypeError, RuntimeError) as err:
        print(f"runlora-nb: error: {err}", file=sys.stderr)
        return 2
    except OSError as err:  # a read-only cache, a full disk, a file where a folder should be
        print(f"runlora-nb: error: {_os_error(err)}", file=sys.stderr)
        return 2


def _os_error(err: OSError) -> str:
    """One line for an OSError, naming the path and, for the cache, the variable that moves it."""
    from ..common.paths import cache_root

    where = err.filename or ""
    text = f"{err.strerror or err}: {where}" if where else str(err)
    root = cache_root()
    if where and Path(where).resolve().is_relative_to(root.resolve()):
        text += f" (the runlora_nb cache {root} is not writable; set RUNLORA_NB_CACHE to a writable folder)"
    return text


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
