"""``runlora-nb export`` and ``runlora-nb memory``: the proof-of-concept answers from a shell.

Examples:
    runlora-nb export --model smollm2-135m --adapter runs/ID/adapter --format gguf --out exports/smol
    runlora-nb export --model smollm2-135m --adapter runs/ID/adapter --format gguf --out exports/smol.gguf
    runlora-nb export --model smollm2-135m --adapter runs/ID/adapter --format gguf-adapter --out exports/lora
    runlora-nb memory --model smollm2-135m --batch 4 --seq 256 --rank 16 --budget-gib 8
"""

from __future__ import annotations

import argparse
import sys

from .argtypes import dropout, positive_float, positive_int

__all__ = ["add_parsers", "handlers"]


def add_parsers(sub) -> None:
    """Add the ``export`` and ``memory`` subcommands to the CLI's subparsers."""
    from ..assess.export import FORMATS

    ex = sub.add_parser(
        "export", help="export a tuned model (PEFT adapter, merged folder, GGUF) with a parity check"
    )
    ex.add_argument("--model", required=True, help="zoo name or local model folder (the base)")
    ex.add_argument(
        "--adapter",
        required=True,
        help="the adapter folder (PEFT format), or a run folder (RUN_DIR: its adapter/ is used)",
    )
    ex.add_argument("--format", default="merged", choices=FORMATS)
    ex.add_argument(
        "--out",
        required=True,
        help="destination folder (an earlier export there is replaced atomically); with --format gguf, a path "
        "ending in .gguf is written as that file, with X.Modelfile and X.parity.json beside it",
    )
    ex.add_argument(
        "--force",
        action="store_true",
        help="replace --out even if it is a non-empty folder that is not an export (or existing .gguf files)",
    )
    ex.add_argument("--dtype", default="f16", choices=["f32", "f16", "bf16"], help="GGUF tensor type")
    ex.add_argument(
        "--pre-tokenizer",
        default=None,
        help="GGUF: llama.cpp pre-tokenizer name (tokenizer.ggml.pre) for a tokenizer it is not recognised from",
    )
    ex.add_argument(
        "--base-gguf",
        default=None,
        help="gguf-adapter: the base GGUF the Modelfile's FROM names (ours from --format gguf of the base, or "
        "the model authors'); without it base.gguf is written beside adapter.gguf",
    )

    mem = sub.add_parser("memory", help="predict a fine-tune's memory, then measure it (PEFT vs runlora_nb)")
    mem.add_argument("--model", default="tiny-llama", help="zoo name or local folder")
    mem.add_argument("--batch", type=positive_int, default=4)
    mem.add_argument("--seq", type=positive_int, default=128)
    mem.add_argument("--rank", "-r", type=positive_int, default=8)
    mem.add_argument("--dropout", type=dropout, default=0.05)
    mem.add_argument(
        "--budget-gib", type=positive_float, default=None, help="also: the largest batch that fits"
    )
    mem.add_argument("--no-measure", action="store_true", help="predict only (no full-size forward)")


def _export(args: argparse.Namespace) -> int:
    from ..assess.export import export_from_files

    result = export_from_files(
        args.model,
        args.adapter,
        args.format,
        args.out,
        dtype=args.dtype,
        force=args.force,
        pre_tokenizer=args.pre_tokenizer,
        base_gguf=args.base_gguf,
    )
    print(f"{result.format} export: {result.path} ({', '.join(result.files)})")
    if not result.parity.get("ok", True):
        # one line, not a traceback: the figures are in the parity line above and in parity.json
        failed = ", ".join(result.parity["failed"])
        print(
            f"runlora-nb: error: export parity failed ({failed}): {result.path} does not behave like the tuned "
            f"model; see {result.parity_file} (the export is kept for inspection)",
            file=sys.stderr,
        )
        return 1
    return 0


def _mib(n) -> str:
    return "–" if n is None or n != n else f"{n / 2**20:,.1f}"


def _memory(args: argparse.Namespace) -> int:
    from ..assets.loading import check_positions
    from ..assets.zoo import load_model
    from ..measure.memory_ledger import MemoryLedger

    model, _ = load_model(args.model)
    check_positions(model.config, args.seq, repr(args.model), "memory --seq")
    ledger = MemoryLedger(model, r=args.rank, alpha=2 * args.rank, dropout=args.dropout)
    pred = ledger.predict(args.batch, args.seq)
    cols = ["weights_bytes", "adapter_bytes", "grad_bytes", "optimizer_bytes", "activation_bytes",
            "temporaries_bytes", "process_bytes", "total_bytes"]  # fmt: skip
    print(f"{args.model}, batch {args.batch} × seq {args.seq}, r={args.rank}, dropout {args.dropout} (MiB):")
    print(f"{'backend':<9}" + "".join(f"{c.removesuffix('_bytes'):>13}" for c in cols))
    for _, row in pred.iterrows():
        print(f"{row['backend']:<9}" + "".join(f"{_mib(row[c]):>13}" for c in cols))
    if not args.no_measure:
        cmp = ledger.compare(args.batch, args.seq)
        for _, row in cmp.iterrows():
            print(
                f"measured {row['backend']}: saved activations {_mib(row['activation_bytes_measured'])} MiB "
                f"(saved_tensors_hooks; predicted {_mib(row['activation_bytes_predicted'])}, ratio "
                f"{row['ratio']:.3f}); one step's peak {_mib(row['step_bytes_measured'])} MiB (RSS / allocator; "
                f"predicted {_mib(row['step_bytes_predicted'])}, ratio {row['step_ratio']:.3f})"
            )
    print("total is a lower bound: it leaves out backward's transients and the allocator's slack")
    if args.budget_gib:
        budget = int(args.budget_gib * 2**30)
        for backend in ledger.backends:
            fits = ledger.largest_batch(budget, args.seq, backend, measure=not args.no_measure)
            how = (
                "predicted only (--no-measure): optimistic"
                if args.no_measure
                else "measured: "
                + ", ".join(f"batch {b} {_mib(d)} MiB" for b, d in ledger.last_fit["steps"])
                + f" + {_mib(ledger.last_fit['fixed_bytes'])} MiB held, {ledger.last_fit['headroom']:.0%} spare"
                + (
                    ""
                    if ledger.last_fit["verified"]
                    else "; not verified: the budget exceeds the free memory"
                )
            )
            print(f"largest batch within {args.budget_gib} GiB at seq {args.seq}, {backend}: {fits} ({how})")
    return 0


def handlers() -> dict:
    """(command, subcommand) → handler for the CLI's dispatch table."""
    return {("export", None): _export, ("memory", None): _memory}
