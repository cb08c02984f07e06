"""The FineTuner under torchrun, run by tests/integrations/test_distributed_finetuner.py.

``python -m torch.distributed.run --nproc-per-node 2 --standalone finetuner_ddp_script.py RUNS OUT [stop]``
trains a recorded run (``runlora_nb.ledger.recorded_tuner``) on 2 ranks; every rank writes its losses and the
SHA-256 of its final adapter to ``OUT/rank{r}.json``. With ``stop``, rank 1 asks to stop at step 2 (rank 0 must
follow), and the run is resumed on 2 ranks by a second launch with ``resume``. With ``die``, rank 1 exits after
step 2 of a run that checkpoints every step.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path

CFG = {"model": "tiny-llama", "lr": 3e-3, "seq_len": 32, "batch_size": 2, "eval_batches": 1, "dropout": 0.0,
       "dtype": "fp32", "chain": "flops", "steps": 4, "eval_interval": 2, "checkpoint_every": 0,
       "sample_prompts": ("Shall I",), "sample_tokens": 4, "device": "cpu"}  # fmt: skip


def digest(model) -> str:
    h = hashlib.sha256()
    for name, p in sorted((n, p) for n, p in model.named_parameters() if p.requires_grad):
        h.update(name.encode())
        h.update(p.detach().contiguous().view(-1).numpy().tobytes())
    return h.hexdigest()


def main(runs: str, out: str, mode: str = "") -> None:
    from runlora_nb.ledger import recorded_tuner, resume_tuner
    from runlora_nb.train import FineTuneConfig

    rank = int(os.environ.get("RANK", "0"))
    # "die" checkpoints every step; rank 1 dies after step 2 (rank 0 is left in a collective)
    cfg = FineTuneConfig(**{**CFG, "checkpoint_every": 1 if mode == "die" else 0}, runs_dir=runs)
    if mode == "resume":
        (run_id,) = [p.name for p in Path(runs).iterdir()]
        tuner = resume_tuner(run_id, runs_dir=runs)
    else:
        tuner = recorded_tuner(cfg)
    if mode == "die" and rank == 1:
        tuner.history.on_step = _chain(tuner.history.on_step, lambda e: os._exit(17) if e.step == 2 else None)
    if mode == "stop" and rank == 1:

        class StopOnRank1:
            def on_step(self, event):
                if event.step == 2:
                    tuner.stop()

        tuner.history.on_step = _chain(tuner.history.on_step, StopOnRank1().on_step)
    history = tuner.run()
    record = {"rank": rank, "world": tuner.ranks.world, "losses": [s.loss for s in history.steps],
              "tokens": [s.tokens for s in history.steps], "adapter": digest(tuner.model),
              "end_step": history.end.step, "samples": len(history.samples)}  # fmt: skip
    Path(out, f"rank{rank}{'-' + mode if mode else ''}.json").write_text(json.dumps(record))


def _chain(first, second):
    def both(event):
        first(event)
        second(event)

    return both


if __name__ == "__main__":
    main(*sys.argv[1:])
