"""Loss-curve equivalence: the same init, data and seed trained with PEFT and with runlora_nb.

Usage: python scripts/loss_equivalence.py [--steps 30] [--model tiny-llama]
Prints, per setting (fp32, bf16, nf4), the largest per-step relative loss difference and both curves' ends.
Dropout is 0: the two libraries draw dropout masks from different random streams.
"""

from __future__ import annotations

import argparse
import tempfile
from dataclasses import replace

from runlora_nb.train import FineTuneConfig, FineTuner

SETTINGS = {"fp32": ("fp32", None, 1e-5), "bf16": ("bf16", None, 1e-2), "nf4": ("fp32", "nf4", 1e-2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--model", default="tiny-llama")
    args = parser.parse_args()
    for name, (dtype, quant, tol) in SETTINGS.items():
        with tempfile.TemporaryDirectory() as tmp:
            cfg = FineTuneConfig(
                model=args.model, steps=args.steps, lr=3e-3, seq_len=64, batch_size=8, dropout=0.0, dtype=dtype,
                quantization=quant, eval_interval=0, sample_prompts=(), output_dir=f"{tmp}/runlora",
            )  # fmt: skip
            ours = [s.loss for s in FineTuner(cfg).run().steps]
            theirs = [
                s.loss for s in FineTuner(replace(cfg, backend="peft", output_dir=f"{tmp}/peft")).run().steps
            ]
        worst = max(abs(a - b) / abs(b) for a, b in zip(ours, theirs))
        verdict = "OK" if worst <= tol else "MISS"
        print(
            f"{name:5s} {args.steps} steps: max rel diff {worst:.2e} (target {tol:g}) {verdict}; "
            f"loss {theirs[0]:.4f} → PEFT {theirs[-1]:.4f} / runlora_nb {ours[-1]:.4f}"
        )


if __name__ == "__main__":
    main()
