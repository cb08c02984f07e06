"""Where the time of one LoRA layer step goes: a per-op profile against the frozen ``nn.Linear``.

Runs forward + backward of a :class:`~runlora_nb.RunLoRALinear` (the planner's pair, or ``--pair``) and of the
frozen base layer it wraps (its two GEMMs: Y = X·W and dX = dY·Wᵀ), ``--steps`` times each, interleaved. Every
step is profiled with ``torch.profiler``; ops are grouped by name, shapes and dtypes, and each row shows the
median self time per step, the bytes the op reads and writes, the achieved GB/s (and GFLOP/s for products), and
which N-row tensors it passes over (X is N×i, dY / Y are N×o). Unprofiled wall times of both layers come last.

Example::

    OMP_NUM_THREADS=2 python scripts/profile_layer.py --tokens 4096 --in 768 --out 768 --rank 8 \\
        --dtype bf16 --adapter-dtype fp32 --dropout 0.1
"""

from __future__ import annotations

import argparse
import math
import os
import resource
import statistics
import time
from collections import defaultdict

import torch
from torch import nn
from torch.profiler import ProfilerActivity, profile

from runlora_nb import RunLoRALinear

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
PRODUCTS = {"aten::mm", "aten::addmm", "aten::addmm_", "aten::bmm", "aten::matmul"}
# ops whose first tensor argument is written in place (read and written: counted twice)
IN_PLACE_FIRST = {"aten::addmm_", "aten::mul_", "aten::add_", "aten::masked_fill_", "aten::bernoulli_"}


def _numel(shape) -> int:
    return math.prod(shape) if shape else 1


def _itemsize(dt: str) -> int:
    return {"float": 4, "c10::bfloat16": 2, "c10::half": 2, "double": 8, "bool": 1, "unsigned char": 1}.get(
        dt.lower(), 4
    )


def _op_cost(name: str, shapes, dtypes) -> tuple[int, int]:
    """(bytes read + written, FLOPs) of one op from its argument shapes and dtypes.

    Products: inputs read once, output written once. ``copy_`` reads its source and writes its destination.
    Elementwise ops: inputs read, the largest input's shape written (in place: the first argument).
    """
    tens = [
        (tuple(s), _itemsize(d))
        for s, d in zip(shapes, dtypes)
        if d and isinstance(s, (list, tuple)) and (not s or isinstance(s[0], int))
    ]
    if not tens:
        return 0, 0
    read = sum(_numel(s) * k for s, k in tens)
    flops = 0
    if name in PRODUCTS:
        mats = [t for t in tens if len(t[0]) == 2]
        (m, k_), kk = mats[-2]
        (_, n), _ = mats[-1]
        flops = 2 * m * k_ * n
        write = m * n * kk
    elif name == "aten::copy_":
        write = 0  # the destination is one of the two inputs: already counted
    elif name in IN_PLACE_FIRST:
        write = _numel(tens[0][0]) * tens[0][1]
    else:
        big = max(tens, key=lambda t: _numel(t[0]))
        write = _numel(big[0]) * big[1]
    return read + write, flops


def _passes(shapes, n: int, i: int, o: int) -> str:
    """Which N-row tensors an op touches: ``X`` (N, i), ``Y`` (N, o), ``T`` (N, r)."""
    tags = []
    for s in shapes:
        if isinstance(s, (list, tuple)) and len(s) == 2 and isinstance(s[0], int):
            if s[0] == n and s[1] == i and "X" not in tags:
                tags.append("X")
            elif s[0] == n and s[1] == o and "Y" not in tags:
                tags.append("Y")
            elif (s[1] == n and s[0] in (i, o)) and "Xᵀ/Yᵀ" not in tags:
                tags.append("Xᵀ/Yᵀ")
    return ",".join(tags)


def _leaf_events(prof):
    """Profiler events with their own time (self time), skipping the Python-level wrappers."""
    for evt in prof.events():
        if evt.name.startswith(("aten::", "autograd::")) and evt.self_cpu_time_total > 0:
            yield evt


def _busy_s() -> tuple[float, float, float]:
    """(machine busy CPU seconds, this process's CPU seconds, wall seconds): their deltas tell how much of the
    machine other processes took while we measured (2 threads timed against a busy core wait for it)."""
    try:
        with open("/proc/stat") as f:
            fields = [int(v) for v in f.readline().split()[1:]]
        busy = (sum(fields[:8]) - fields[3] - fields[4]) / os.sysconf("SC_CLK_TCK")  # all but idle, iowait
    except (OSError, ValueError):
        busy = float("nan")
    t = os.times()
    return busy, t.user + t.system, time.perf_counter()


def _step(module: nn.Module, x: torch.Tensor, dy: torch.Tensor) -> None:
    y = module(x)
    y.backward(dy)
    x.grad = None
    for p in module.parameters():
        p.grad = None


def _profile_step(module, x, dy, rows: dict) -> None:
    """One profiled step; adds each op group's self time (µs) in forward and backward to ``rows``."""
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as pf:
        y = module(x)
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as pb:
        y.backward(dy)
    x.grad = None
    for p in module.parameters():
        p.grad = None
    step: dict = defaultdict(float)
    calls: dict = defaultdict(int)
    for phase, prof in (("fwd", pf), ("bwd", pb)):
        for evt in _leaf_events(prof):
            shapes = tuple(tuple(s) if isinstance(s, list) else s for s in evt.input_shapes)
            key = (phase, evt.name, str(shapes), tuple(evt.input_dtypes))
            step[key] += evt.self_cpu_time_total
            calls[key] += 1
            rows.setdefault(key, {"shapes": evt.input_shapes, "dtypes": evt.input_dtypes, "times": []})
    for key, us in step.items():
        rows[key]["times"].append(us)
        rows[key]["calls"] = calls[key]


def _table(title: str, rows: dict, steps: int, n: int, i: int, o: int) -> float:
    """Prints one layer's op table; returns the summed median self time (ms) per step."""
    print(f"\n## {title}")
    print(
        "| phase | op | shapes | dtypes | calls | ms (median/step) | MB moved | GB/s | GFLOP/s | passes |\n"
        "|---|---|---|---|---|---|---|---|---|---|"
    )
    total = 0.0
    lines = []
    small: list[float] = []
    for (phase, name, _, _), r in rows.items():
        times = r["times"] + [0.0] * (steps - len(r["times"]))  # absent in a step: 0
        ms = statistics.median(times) / 1e3
        total += ms
        if ms < 0.05:  # launch overhead, views, tiny casts: one line for all of them
            small.append(ms)
            continue
        calls = r.get("calls", 1)
        nbytes, flops = (v * calls for v in _op_cost(name, r["shapes"], r["dtypes"]))
        gbs = nbytes / (ms * 1e-3) / 1e9
        gfl = f"{flops / (ms * 1e-3) / 1e9:.0f}" if flops else ""
        shapes = " ".join(str(tuple(s)) for s in r["shapes"] if isinstance(s, list) and s)
        dts = ",".join(sorted({d.replace("c10::", "") for d in r["dtypes"] if d}))
        passes = _passes(r["shapes"], n, i, o)
        lines.append((phase, -ms, name, shapes, dts, calls, ms, nbytes / 1e6, gbs, gfl, passes))
    for phase, _, name, shapes, dts, calls, ms, mb, gbs, gfl, passes in sorted(lines):
        cells = [phase, name, shapes, dts, calls, f"{ms:.3f}", f"{mb:.1f}", f"{gbs:.1f}", gfl, passes]
        print("| " + " | ".join(str(c) for c in cells) + " |")
    print(f"| | other ops < 0.05 ms ({len(small)} groups) | | | | {sum(small):.3f} | | | | |")
    print(f"| | **sum of op medians** | | | | **{total:.3f}** | | | | |")
    return total


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", "-N", type=int, default=4096, help="N = batch × sequence (default 4096)")
    ap.add_argument("--in", dest="in_features", type=int, default=768, help="in_features i (default 768)")
    ap.add_argument("--out", dest="out_features", type=int, default=768, help="out_features o (default 768)")
    ap.add_argument("--rank", "-r", type=int, default=8, help="LoRA rank (default 8)")
    ap.add_argument("--dtype", default="fp32", choices=DTYPES, help="base dtype (default fp32)")
    ap.add_argument("--adapter-dtype", default=None, choices=DTYPES, help="adapter dtype (default: --dtype)")
    ap.add_argument("--dropout", type=float, default=0.0, help="adapter dropout (default 0)")
    ap.add_argument("--steps", type=int, default=15, help="profiled steps per layer (default 15)")
    ap.add_argument("--pair", default="auto", help="chain pair like fwd1,bwd1 (default: the planner's)")
    args = ap.parse_args(argv)

    n, i, o, r = args.tokens, args.in_features, args.out_features, args.rank
    dtype = DTYPES[args.dtype]
    adapter_dtype = DTYPES[args.adapter_dtype or args.dtype]
    gen = torch.Generator().manual_seed(0)
    base = nn.Linear(i, o, bias=False)
    with torch.no_grad():
        base.weight.copy_(torch.randn(o, i, generator=gen) / math.sqrt(i))
    base = base.to(dtype).requires_grad_(False)
    chain = tuple(args.pair.split(",")) if "," in args.pair else args.pair
    lora = RunLoRALinear(
        base, r=r, alpha=2 * r, dropout=args.dropout, chain=chain, adapter_dtype=adapter_dtype
    )
    lora.train()
    with torch.no_grad():  # B = 0 would make some products trivially cheap
        lora.lora_B.weight.copy_(torch.randn(o, r, generator=gen) * 0.01)
    x = torch.randn(n, i, generator=gen).to(dtype).requires_grad_(True)
    dy = torch.randn(n, o, generator=gen).to(dtype)
    plan = lora.plan(n)

    print(
        f"# N={n}, {i}→{o}, r={r}, base {args.dtype}, adapters {args.adapter_dtype or args.dtype}, "
        f"dropout {args.dropout}; torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"load average {os.getloadavg()[0]:.2f}"
    )
    print(f"pair: {plan.fwd}+{plan.bwd} ({plan.mode}); bytes(X) = {n * i * x.element_size() / 1e6:.1f} MB")
    start = _busy_s()
    for _ in range(3):  # warm-up: allocator, oneDNN primitive caches, the planner
        _step(lora, x, dy)
        _step(base, x, dy)

    rows_lora: dict = {}
    rows_frozen: dict = {}
    for _ in range(args.steps):  # interleaved, so drift on a shared machine hits both alike
        _profile_step(lora, x, dy, rows_lora)
        _profile_step(base, x, dy, rows_frozen)
    t_lora = _table(f"RunLoRALinear {plan.fwd}+{plan.bwd}", rows_lora, args.steps, n, i, o)
    t_frozen = _table("frozen nn.Linear", rows_frozen, args.steps, n, i, o)

    wall = {"lora": [], "frozen": []}
    faults = {"lora": [], "frozen": []}  # minor page faults: fresh large buffers the kernel maps and zeroes
    for _ in range(args.steps):
        for name, mod in (("lora", lora), ("frozen", base)):
            f0, t0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt, time.perf_counter()
            _step(mod, x, dy)
            wall[name].append(time.perf_counter() - t0)
            faults[name].append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)
    busy, own, wall_s = (b - a for a, b in zip(start, _busy_s()))
    print(
        f"\nother processes used {(busy - own) / wall_s:.2f} cores on average during the run "
        f"(above ~0.1 the 2-thread figures are not trustworthy: rerun, or use OMP_NUM_THREADS=1)"
    )
    ml, mf = (statistics.median(wall[k]) * 1e3 for k in ("lora", "frozen"))
    print(
        f"op sums: lora {t_lora:.3f} ms, frozen {t_frozen:.3f} ms (ratio {t_lora / t_frozen:.2f}); "
        f"unprofiled wall medians of {args.steps}: lora {ml:.3f} ms, frozen {mf:.3f} ms (ratio {ml / mf:.2f}); "
        f"minor page faults per step: lora {statistics.median(faults['lora']):.0f}, "
        f"frozen {statistics.median(faults['frozen']):.0f} (4 KiB each)"
    )


if __name__ == "__main__":
    main()
