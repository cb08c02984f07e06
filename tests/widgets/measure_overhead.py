"""How much the run ledger + a FineTunePanel slow training, against the bare engine (not a test: a script).

Each pair of runs trains the same config twice, once with a bare :class:`~runlora_nb.train.FineTuner` (no
ledger) in a background thread and once through a :class:`~runlora_nb.widgets.FineTunePanel` (the run ledger's
files, controller callbacks, throttled chart redraws, status and progress widgets); the order alternates
between pairs. The time per step is
the wall time between consecutive step events (so it includes the callbacks), median over the steps after the
first two. Run it in a kernel for real widget traffic, or as a script (the widgets then serialise their state
but have no frontend)::

    python tests/widgets/measure_overhead.py --model tiny-llama --pairs 5
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import time

from runlora_nb.train import FineTuneConfig, FineTuner
from runlora_nb.widgets import FineTuneController, FineTunePanel


def per_step_seconds(steps) -> float:
    """Median wall time between step events, leaving out the first two (planning, warm-up)."""
    t = [s.elapsed_s for s in steps]
    gaps = [b - a for a, b in itertools.pairwise(t[1:])]
    return statistics.median(gaps)


def bare(config: FineTuneConfig) -> float:
    trainer = FineTuner(config)
    trainer.start()
    return per_step_seconds(trainer.join().steps)


def with_panel(config: FineTuneConfig) -> tuple[float, int]:
    panel = FineTunePanel(
        FineTuneController(base_config=config, steps=config.steps, eval_interval=0, lr=config.lr)
    )
    panel.start_button.click()
    assert panel.controller.join(600)
    trainer = panel.controller.trainers[0]
    redraws = panel._redraw.runs
    panel.close()
    return per_step_seconds(trainer.history.steps), redraws


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="tiny-llama")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--pairs", type=int, default=5)
    args = ap.parse_args()
    config = FineTuneConfig(
        model=args.model,
        steps=args.steps,
        batch_size=args.batch,
        seq_len=args.seq,
        lr=1e-3,
        eval_interval=0,
        sample_prompts=(),
        output_dir=None,
    )
    bare(config)  # warm-up: imports, planner cache, cost-model calibration
    rows = []
    for k in range(args.pairs):
        order = ("bare", "panel") if k % 2 == 0 else ("panel", "bare")
        result = {}
        for which in order:
            if which == "bare":
                result["bare"] = bare(config)
            else:
                result["panel"], result["redraws"] = with_panel(config)
        rows.append(result)
        print(
            f"pair {k}: bare {result['bare'] * 1e3:.2f} ms/step, panel {result['panel'] * 1e3:.2f} ms/step "
            f"({result['panel'] / result['bare'] - 1:+.1%}), {result['redraws']} redraws",
            flush=True,
        )
    b = statistics.median(r["bare"] for r in rows)
    p = statistics.median(r["panel"] for r in rows)
    ratios = [r["panel"] / r["bare"] for r in rows]
    print(
        f"{args.model} batch {args.batch} × seq {args.seq}, {args.steps} steps × {args.pairs} pairs: "
        f"bare {b * 1e3:.2f} ms/step, with panel {p * 1e3:.2f} ms/step, overhead {p / b - 1:+.1%} "
        f"(median of per-pair ratios {statistics.median(ratios) - 1:+.1%})"
    )


if __name__ == "__main__":
    t0 = time.perf_counter()
    main()
    print(f"({time.perf_counter() - t0:.0f} s)")
