"""``runlora-nb train`` and ``runlora-nb runs list|show|compare|rm``: the run ledger from a shell.

Examples:
    runlora-nb train --model tiny-llama --steps 40 --lr 3e-3 --checkpoint-every 10
    runlora-nb train --resume 20261202-101500-runlora-1a2b3c4d
    runlora-nb train --config run.yaml
    runlora-nb runs list
    runlora-nb runs compare ID1 ID2 --json fig.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

__all__ = ["add_parsers", "handlers"]


def add_parsers(sub) -> None:
    """Add the ``train`` and ``runs`` subcommands to the CLI's subparsers."""
    train = sub.add_parser("train", help="fine-tune with LoRA, recorded in the run ledger (resumable)")
    train.add_argument("--resume", metavar="ID", help="continue run ID from its last checkpoint")
    train.add_argument(
        "--config",
        type=Path,
        metavar="RUN.yaml",
        help="a YAML of FineTuneConfig fields; it replaces the other config flags (--runs-dir and --out still apply)",
    )
    train.add_argument("--model", default="tiny-llama", help="zoo name or local folder (default tiny-llama)")
    train.add_argument("--dataset", default="sonnets")
    train.add_argument("--steps", type=int, default=40)
    train.add_argument("--rank", "-r", type=int, default=8)
    train.add_argument("--alpha", type=float, default=None, help="default 2·rank")
    train.add_argument("--lr", type=float, default=3e-4)
    train.add_argument("--dropout", type=float, default=0.05)
    train.add_argument("--dtype", default="fp32")
    train.add_argument("--batch", type=int, default=4)
    train.add_argument("--seq", type=int, default=128)
    train.add_argument("--backend", default="runlora", choices=["runlora", "peft"])
    train.add_argument("--chain", default="auto", choices=["auto", "flops", "timed"])
    train.add_argument("--eval-interval", type=int, default=10)
    train.add_argument("--checkpoint-every", type=int, default=20)
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--no-samples", action="store_true", help="skip the before/after generations")
    train.add_argument("--runs-dir", default=None, help="ledger root (default $RUNLORA_NB_RUNS or the cache)")
    train.add_argument("--out", default=None, help="adapter folder (default: the run folder's adapter/)")

    runs = sub.add_parser("runs", help="the run ledger: list, show, compare, remove runs").add_subparsers(
        dest="what", required=True
    )
    for name, text in (
        ("list", "every run, newest first"),
        ("show", "one run: status, config, curves"),
        ("compare", "runs side by side"),
        ("rm", "delete runs"),
    ):
        p = runs.add_parser(name, help=text)
        if name != "list":
            p.add_argument("ids", nargs="+", metavar="ID")
        p.add_argument("--runs-dir", default=None, help="ledger root (default $RUNLORA_NB_RUNS or the cache)")
        if name in ("list", "compare"):
            p.add_argument("--csv", type=Path, help="also write the table as CSV")
        if name == "compare":
            p.add_argument("--json", type=Path, help="write the plotly figure spec as JSON")
        if name == "rm":
            p.add_argument(
                "--force",
                action="store_true",
                help="also delete a run marked running on another machine (never one alive here)",
            )


def _train(args: argparse.Namespace) -> int:
    from ..tuning import FineTuneConfig, FineTuner, PrintProgress
    from ..tuning.config import load_config

    progress = [PrintProgress(every=max(args.steps // 8, 1))]
    if args.resume:
        tuner = FineTuner.resume(args.resume, progress, runs_dir=args.runs_dir)
        print(f"resuming run {tuner.run_dir.name} from step {tuner._resume_state['step']}")
    elif args.config is not None:
        cfg = load_config(args.config, runs_dir=args.runs_dir, output_dir=args.out)
        tuner = FineTuner(cfg, [PrintProgress(every=max(cfg.steps // 8, 1))])
    else:
        cfg = FineTuneConfig(
            model=args.model,
            dataset=args.dataset,
            steps=args.steps,
            r=args.rank,
            alpha=args.alpha if args.alpha is not None else 2 * args.rank,
            lr=args.lr,
            dropout=args.dropout,
            dtype=args.dtype,
            batch_size=args.batch,
            seq_len=args.seq,
            backend=args.backend,
            chain=args.chain,
            eval_interval=args.eval_interval,
            checkpoint_every=args.checkpoint_every,
            seed=args.seed,
            sample_prompts=() if args.no_samples else FineTuneConfig.sample_prompts,
            runs_dir=args.runs_dir,
            output_dir=args.out,
        )
        tuner = FineTuner(cfg, progress)
    result = tuner.run()
    print(f"run {tuner.run_dir.name if tuner.run_dir else '-'}: {tuner.run_dir}")
    return 3 if result.end is not None and result.end.diverged else 0


def _list(args: argparse.Namespace) -> int:
    from ..tuning.runs import list_runs

    df = list_runs(args.runs_dir)
    if df.empty:
        print("no runs yet (`runlora-nb train` records one)")
    else:
        print(df.drop(columns=["path"]).to_string(index=False, float_format=lambda v: f"{v:.4g}"))
    if args.csv:
        df.to_csv(args.csv, index=False)
    return 0


def _show(args: argparse.Namespace) -> int:
    from ..tuning.runs import load_run

    for run_id in args.ids:
        run = load_run(run_id, args.runs_dir)
        print(f"run {run.id}: {run.status} at step {run.state.get('step', len(run.steps))} — {run.path}")
        if run.state.get("message"):
            print(f"  message: {run.state['message']}")
        for w in run.state.get("warnings") or []:
            print(f"  warning: {w}")
        print("  config: " + ", ".join(f"{k}={v}" for k, v in run.config.items()))
        print(f"  adapter: {run.adapter_dir}; checkpoint: {run.checkpoint}")
        if len(run.evals):
            print(run.evals.to_string(index=False, float_format=lambda v: f"{v:.4f}"))
    return 0


def _compare(args: argparse.Namespace) -> int:
    from ..tuning.run_compare import compare

    cmp = compare(args.ids, args.runs_dir)
    print(cmp.summary.to_string(index=False, float_format=lambda v: f"{v:.4g}"))
    print("config differences:")
    print(cmp.config_diff.to_string(index=False) if len(cmp.config_diff) else "  (none)")
    if args.csv:
        cmp.curves.to_csv(args.csv, index=False)
    if args.json:
        args.json.write_text(json.dumps(cmp.figure))
        print(f"wrote {args.json}")
    return 0


def _rm(args: argparse.Namespace) -> int:
    from ..tuning.runs import remove_run

    for run_id in args.ids:
        print(f"removed {remove_run(run_id, args.runs_dir, force=args.force)}")
    return 0


def handlers() -> dict:
    """(command, subcommand) → handler for the CLI's dispatch table."""
    return {
        ("train", None): _train,
        ("runs", "list"): _list,
        ("runs", "show"): _show,
        ("runs", "compare"): _compare,
        ("runs", "rm"): _rm,
    }
