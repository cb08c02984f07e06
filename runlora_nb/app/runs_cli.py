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

from ..train.config import FineTuneConfig
from .argtypes import dropout, nonneg_int, positive_float, positive_int

__all__ = ["add_parsers", "handlers"]

# --flag dest -> FineTuneConfig field, for the flags whose names differ from the field's
_FIELD_OF = {"rank": "r", "batch": "batch_size", "seq": "seq_len", "out": "output_dir"}
_CONFIG_FLAGS = (
    "model", "dataset", "steps", "rank", "alpha", "lr", "dropout", "dtype", "batch", "seq", "backend", "chain",
    "eval_interval", "checkpoint_every", "seed", "runs_dir", "out", "device",
)  # fmt: skip


def add_parsers(sub) -> None:
    """Add the ``train`` and ``runs`` subcommands to the CLI's subparsers."""
    train = sub.add_parser("train", help="fine-tune with LoRA, recorded in the run ledger (resumable)")
    train.add_argument("--resume", metavar="ID", help="continue run ID from its last checkpoint")
    train.add_argument(
        "--config",
        type=Path,
        metavar="RUN.yaml",
        help="a YAML of FineTuneConfig fields; flags given on the command line override the YAML's values",
    )
    # Config flags default to None ("not given"), so that with --config only the flags typed override the
    # YAML; the defaults shown are FineTuneConfig's, the one place they are defined.
    d = FineTuneConfig()

    def flag(*names: str, field: str, kind=None, text: str = "", **kw) -> None:
        shown = "2·rank" if field == "alpha" else getattr(d, field)
        train.add_argument(*names, type=kind, default=None, help=f"{text}(default {shown})", **kw)

    flag("--model", field="model", text="zoo name or local folder ")
    flag("--dataset", field="dataset")
    flag("--steps", field="steps", kind=positive_int)
    flag("--rank", "-r", field="r", kind=positive_int)
    flag("--alpha", field="alpha", kind=positive_float)
    flag("--lr", field="lr", kind=positive_float)
    flag("--dropout", field="dropout", kind=dropout)
    flag("--dtype", field="dtype")
    flag("--device", field="device", text="auto (cuda, then mps, then cpu), cpu, cuda, cuda:N or mps ")
    flag("--batch", field="batch_size", kind=positive_int)
    flag("--seq", field="seq_len", kind=positive_int)
    flag("--backend", field="backend", choices=["runlora", "peft"])
    flag("--chain", field="chain", choices=["auto", "flops", "timed"])
    flag("--eval-interval", field="eval_interval", kind=nonneg_int)
    flag("--checkpoint-every", field="checkpoint_every", kind=nonneg_int)
    flag("--seed", field="seed", kind=int)
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


def train_config(args: argparse.Namespace) -> FineTuneConfig:
    """The run's config: FineTuneConfig's defaults, then the ``--config`` YAML, then the flags given.

    A flag given on the command line overrides the YAML's value; one not given leaves it (or the default).
    ``--alpha`` not given and not in the YAML is 2·rank.

    Raises:
        ValueError: the YAML is unreadable or names an unknown field, or a value is invalid.
    """
    from ..train.config import config_fields, config_from_fields

    data = config_fields(args.config) if args.config is not None else {}
    for dest in _CONFIG_FLAGS:
        value = getattr(args, dest)
        if value is not None:
            data[_FIELD_OF.get(dest, dest)] = value
    if args.no_samples:
        data["sample_prompts"] = ()
    if "alpha" not in data:
        data["alpha"] = 2 * data.get("r", FineTuneConfig.r)
    return config_from_fields(data, f"train --config {args.config}" if args.config is not None else "train")


def _train(args: argparse.Namespace) -> int:
    from ..ledger.recorded import recorded_tuner, resume_tuner
    from ..train.events import PrintProgress

    if args.resume:
        steps = args.steps or FineTuneConfig.steps
        tuner = resume_tuner(args.resume, [PrintProgress(every=max(steps // 8, 1))], runs_dir=args.runs_dir)
        print(f"resuming run {tuner.run_dir.name} from step {tuner.resume_step}")
    else:
        cfg = train_config(args)
        tuner = recorded_tuner(cfg, [PrintProgress(every=max(cfg.steps // 8, 1))])
    result = tuner.run()
    print(f"run {tuner.run_dir.name if tuner.run_dir else '-'}: {tuner.run_dir}")
    return 3 if result.end is not None and result.end.diverged else 0


def _list(args: argparse.Namespace) -> int:
    from ..ledger import list_runs, runs_root

    df = list_runs(args.runs_dir)
    root = runs_root(args.runs_dir, create=False)
    if not root.is_dir():
        print(
            f"no runs in {root}: the folder does not exist (`runlora-nb train --runs-dir {root}` records one)"
        )
    elif df.empty:
        print("no runs yet (`runlora-nb train` records one)")
    else:
        print(df.drop(columns=["path"]).to_string(index=False, float_format=lambda v: f"{v:.4g}"))
    if args.csv:
        df.to_csv(args.csv, index=False)
    return 0


def _show(args: argparse.Namespace) -> int:
    from ..ledger import load_run

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
    from ..ledger.run_compare import compare

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
    from ..ledger import remove_run

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
