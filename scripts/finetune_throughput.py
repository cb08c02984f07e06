"""Fine-tuning throughput, runlora_nb vs PEFT, from one config and seed (alternating short runs, one process).

Usage: python scripts/finetune_throughput.py [--model smollm2-135m] [--rounds 3] [--steps 8]
Prints the median tokens/s of each backend (first step of every run excluded: it includes planning) and the ratio.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from dataclasses import replace

from runlora_nb.train import FineTuneConfig, FineTuner


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--dtype", default="fp32")
    args = parser.parse_args()
    base = FineTuneConfig(
        model=args.model, steps=args.steps, batch_size=args.batch, seq_len=args.seq, r=8, alpha=16, dropout=0.05,
        targets="all-linear", dtype=args.dtype, eval_interval=0, eval_batches=1, sample_prompts=(),
    )  # fmt: skip
    rates: dict[str, list[float]] = {"runlora": [], "peft": []}
    with tempfile.TemporaryDirectory() as tmp:
        for k in range(args.rounds):
            for backend in ("runlora", "peft"):
                cfg = replace(base, backend=backend, output_dir=f"{tmp}/{backend}{k}")
                steps = FineTuner(cfg).run().steps
                rates[backend] += [s.tokens_per_s for s in steps[1:]]
    med = {b: statistics.median(v) for b, v in rates.items()}
    print(
        f"{args.model} {args.dtype}, batch {args.batch}×{args.seq}, r=8 all-linear, dropout 0.05, "
        f"{args.rounds} alternating rounds × {args.steps} steps: runlora_nb {med['runlora']:,.0f} tok/s, "
        f"PEFT {med['peft']:,.0f} tok/s, ratio {med['runlora'] / med['peft']:.2f}×"
    )


if __name__ == "__main__":
    main()
