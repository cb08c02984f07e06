"""``runlora-nb sweep``: a hyper-parameter sweep from a shell; re-running the same command resumes it.

Each searched option takes one value, a comma list of choices or a ``LOW:HIGH[:log]`` range:

    runlora-nb sweep --model tiny-llama --dataset sonnets --r 4,8,16 --lr 1e-3,3e-3 --steps 20 --trials 6 \\
        --study lr-rank
    runlora-nb sweep --model tiny-llama --lr 1e-4:1e-2:log --r 4:32 --sampler tpe --trials 20 --study tpe1
"""

from __future__ import annotations

import argparse
from pathlib import Path

__all__ = ["add_parser", "handlers"]

# option → (SearchSpace field, value kind)
_SPACE_OPTIONS = {
    "r": ("r", int),
    "alpha": ("alpha", float),
    "alpha_over_r": ("alpha_over_r", float),
    "lr": ("lr", float),
    "dropout": ("dropout", float),
    "targets": ("targets", str),
    "quantization": ("quantization", str),
    "dtype": ("dtype", str),
    "backend": ("backend", str),
    "chain": ("chain", str),
    "use_rslora": ("use_rslora", bool),
    "lora_plus_ratio": ("lora_plus_ratio", float),
}


def add_parser(sub) -> None:
    """Add the ``sweep`` subcommand to the CLI's subparsers."""
    p = sub.add_parser(
        "sweep",
        help="hyper-parameter sweep on optuna (each trial a ledger run; re-run the same command to resume)",
        description="Values: V, a comma list V1,V2 (choices) or LOW:HIGH[:log] (a range, numeric options).",
    )
    p.add_argument("--model", default="tiny-llama", help="zoo name or local folder (default tiny-llama)")
    p.add_argument("--dataset", default="sonnets")
    p.add_argument("--steps", type=int, default=20, help="steps per trial (default 20)")
    p.add_argument("--trials", type=int, default=8, help="trial budget (default 8)")
    p.add_argument("--study", required=True, help="study name (the same name resumes)")
    p.add_argument("--storage", default=None, help="SQLite file (default: the cache's sweeps/sweeps.db)")
    for opt in _SPACE_OPTIONS:
        p.add_argument(f"--{opt.replace('_', '-')}", dest=opt, default=None, metavar="VALUES")
    p.add_argument(
        "--sampler", default=None, choices=["grid", "random", "tpe"], help="default: grid if lists"
    )
    p.add_argument("--pruner", default="median", choices=["median", "none"])
    p.add_argument(
        "--timeout", type=float, default=None, help="time budget in seconds (no trial starts after)"
    )
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--eval-interval", type=int, default=None, help="default steps/4")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--device", default="auto", help="auto (cuda, then mps, then cpu), cpu, cuda, cuda:N or mps"
    )
    p.add_argument("--runs-dir", default=None, help="ledger root (default $RUNLORA_NB_RUNS or the cache)")
    p.add_argument("--csv", type=Path, help="also write the leaderboard as CSV")
    p.add_argument("--quiet", action="store_true", help="no line per trial")


def _space(args: argparse.Namespace):
    from ..ledger.space import SearchSpace, parse_values

    values = {}
    for opt, (name, kind) in _SPACE_OPTIONS.items():
        text = getattr(args, opt)
        if text is None:
            continue
        value = parse_values(text, kind)
        if name == "targets":  # a choice is a module list joined by '+': all-linear,q_proj+v_proj
            split = [v if v in (None, "all-linear") else tuple(v.split("+")) for v in _as_list(value)]
            value = split if isinstance(value, list) else split[0]
        values[name] = value
    return SearchSpace.from_dict(values)


def _as_list(value):
    return value if isinstance(value, list) else [value]


def _sweep(args: argparse.Namespace) -> int:
    from ..ledger.sweep import run_sweep

    config = {"batch_size": args.batch, "seq_len": args.seq, "seed": args.seed, "runs_dir": args.runs_dir,
              "device": args.device}  # fmt: skip
    if args.eval_interval is not None:
        config["eval_interval"] = args.eval_interval
    print(f"sweep {args.study!r}: {args.model} on {args.dataset}, {args.steps} steps × {args.trials} trials")
    df = run_sweep(
        args.model,
        args.dataset,
        _space(args),
        args.steps,
        args.trials,
        args.study,
        args.storage,
        sampler=args.sampler,
        pruner=args.pruner,
        timeout=args.timeout,
        config=config,
        seed=args.seed,
        verbose=not args.quiet,
    )
    show = df.drop(columns=["error"]).copy()
    show["peak_mem_bytes"] = show.peak_mem_bytes / 2**20
    show = show.rename(columns={"peak_mem_bytes": "peak MiB", "tokens_per_s": "tokens/s"})
    print(show.to_string(index=False, float_format=lambda v: f"{v:.4g}") if len(show) else "no trials")
    for row in df[df.error.notna()].itertuples():
        print(f"trial {row.trial} {row.status}: {row.error}")
    if args.csv:
        args.csv.parent.mkdir(parents=True, exist_ok=True)
        df.to_csv(args.csv, index=False)
        print(f"wrote {args.csv}")
    done = df.status.isin(["complete", "pruned"])
    return 0 if done.any() or df.empty else 1


def handlers() -> dict:
    """(command, subcommand) → handler for the CLI's dispatch table."""
    return {("sweep", None): _sweep}
