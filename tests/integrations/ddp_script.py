"""A few DDP steps of RunLoRA on tiny-llama (gloo, CPU, fp32), run by tests/integrations/test_distributed.py.

Under ``python -m torch.distributed.run --nproc-per-node 2 --standalone ddp_script.py OUT`` each rank trains on its
share of one global batch; without torchrun :func:`train` runs the whole batch in one process (the reference).
For each dropout in :data:`DROPOUTS` the run writes ``OUT/p{p}.json`` (rank 0: per-step global losses, the adapter's
SHA-256) and ``OUT/p{p}_rank{r}.json`` (every rank: SHA-256 of the train-mode logits on the same input, which
differs between ranks only through their dropout masks), plus ``OUT/p{p}.safetensors`` with the final adapter.
Each rank appends what it finished to ``OUT/progress_rank{r}.txt`` so a slow run can be told apart by step.
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import torch

DROPOUTS = (0.0, 0.05)
STEPS = 3
GLOBAL_BATCH, LENGTH = 4, 16


def global_batch() -> torch.Tensor:
    """(GLOBAL_BATCH, LENGTH) token ids, the same on every rank."""
    return torch.randint(3, 200, (GLOBAL_BATCH, LENGTH), generator=torch.Generator().manual_seed(1))


def progress(out: Path, rank: int, what: str) -> None:
    with open(out / f"progress_rank{rank}.txt", "a") as f:
        f.write(what + "\n")


def adapter_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The trainable tensors, by name without DDP's ``module.`` prefix."""
    return {
        n.removeprefix("module."): p.detach().clone().contiguous()
        for n, p in model.named_parameters()
        if p.requires_grad
    }


def digest(tensors: dict[str, torch.Tensor] | torch.Tensor) -> str:
    h = hashlib.sha256()
    items = tensors.items() if isinstance(tensors, dict) else [("", tensors)]
    for name, t in sorted(items, key=lambda kv: kv[0]):
        h.update(name.encode())
        h.update(t.detach().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def train(p: float, out: Path, rank: int = 0, world: int = 1) -> dict:
    """``STEPS`` SGD steps on the global batch split over ``world`` ranks; returns what rank 0 records.

    Args:
        p: adapter dropout.
        out: output folder.
        rank: this process's rank (0 without DDP).
        world: number of ranks; 1 means no process group and no DDP wrapper.

    Returns:
        ``{"losses": [...], "adapter": sha256, "output": sha256}`` (losses are global means, as floats).
    """
    from safetensors.torch import save_file

    from runlora_nb.assets.zoo import load_model
    from runlora_nb.integrations.inject import apply_runlora

    torch.manual_seed(0)  # every rank seeds alike, as transformers.set_seed does
    model = load_model("tiny-llama")[0]
    # "flops" plans from shapes only: every rank and every run picks the same chains (no timing).
    model = apply_runlora(model, r=4, alpha=8, dropout=p, chain="flops", init_lora_weights=False).train()
    net = model
    if world > 1:
        net = torch.nn.parallel.DistributedDataParallel(model)
    opt = torch.optim.SGD([q for q in model.parameters() if q.requires_grad], lr=0.5, momentum=0.9)
    ids = global_batch()
    share = GLOBAL_BATCH // world
    mine = ids[rank * share : (rank + 1) * share]
    losses = []
    for step in range(STEPS):
        loss = net(
            input_ids=mine, labels=mine
        ).loss  # equal token counts per rank: mean of means = global mean
        opt.zero_grad()
        loss.backward()
        opt.step()
        total = loss.detach().clone()
        if world > 1:
            torch.distributed.all_reduce(total)
            total /= world
        losses.append(float(total))
        progress(out, rank, f"p={p} step {step}")
    torch.manual_seed(123)  # identical inputs and RNG state on every rank: outputs differ by masks only
    with torch.no_grad():
        output = digest(model(input_ids=ids).logits)
    state = adapter_state(model)
    record = {"losses": losses, "adapter": digest(state), "output": output}
    (out / f"p{p}_rank{rank}.json").write_text(json.dumps({"output": output}))
    if rank == 0:
        save_file(state, out / f"p{p}.safetensors")
        (out / f"p{p}.json").write_text(json.dumps(record))
    progress(out, rank, f"p={p} done")
    return record


def main(out: Path) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo")
    try:
        rank, world = dist.get_rank(), dist.get_world_size()
        progress(out, rank, "process group up")
        for p in DROPOUTS:
            train(p, out, rank, world)
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
