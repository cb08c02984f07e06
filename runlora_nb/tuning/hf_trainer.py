"""Record a Hugging Face ``Trainer`` (or TRL ``SFTTrainer``) run into the run ledger, live.

:class:`LedgerCallback` is a plain ``transformers.TrainerCallback``: pass it in ``callbacks=[...]`` and the run
becomes a folder of the ledger (:mod:`.runs`) like any fine-tune of the engine: ``config.json`` (the trainer's
settings, the adapter's rank and alpha, library versions, the chain plan of every RunLoRA layer), one
``metrics.jsonl`` line per logged step (train loss, lr, grad norm, tokens/s, step time, peak memory) and per
evaluation (val loss, perplexity), and ``status.json`` (running → finished / stopped). So ``list_runs()``,
``compare([...])`` and ``runlora-nb runs`` show Trainer runs beside the engine's.

It is also an event source: :meth:`LedgerCallback.subscribe` gets ``("step" | "eval" | "end", record)`` calls
in the training thread; the widget view ``runlora_nb.widgets.trainer_monitor`` draws them live. No widgets here.
"""

from __future__ import annotations

import json
import math
import os
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from transformers import TrainerCallback

from ..common.jsonfiles import read_json_dict, write_json
from ..integrations.inject import runlora_layers
from ..integrations.plans import plan_table
from .runs import _ACTIVE, RunLedger, _versions, new_run_dir

__all__ = ["LedgerCallback"]

Listener = Callable[[str, dict], None]


def _adapter_settings(model: torch.nn.Module) -> dict[str, Any]:
    """Backend, rank, alpha and dropout of the LoRA layers in ``model`` (RunLoRA first, then PEFT's)."""
    layers = [layer for _, layer in runlora_layers(model)]
    if layers:
        first = layers[0]
        return {"backend": "runlora", "r": first.r, "alpha": first.alpha, "dropout": first.dropout}
    for module in model.modules():
        r = getattr(module, "r", None)
        if isinstance(r, dict) and r and hasattr(module, "lora_A"):  # a PEFT LoRA layer
            name = next(iter(r))
            drop = module.lora_dropout[name]
            return {
                "backend": "peft",
                "r": r[name],
                "alpha": module.lora_alpha[name],
                "dropout": float(getattr(drop, "p", 0.0)),
            }
    return {"backend": "trainer", "r": None, "alpha": None, "dropout": None}


class LedgerCallback(TrainerCallback):
    """A ``TrainerCallback`` that writes the run into the ledger and tells subscribers about each step.

    Args:
        run_dir: the run folder; default: a new unique folder under ``root`` named after the backend.
        root: the ledger root (default: ``$RUNLORA_NB_RUNS``, else the cache's ``runs/``).
        model_name: what to record as the model (default: the model config's ``_name_or_path``).
        dataset: what to record as the dataset (free text, e.g. ``"sonnets"``).

    Attributes:
        dir: the run folder (set at ``on_train_begin``), ``id`` its name.
        records: every record sent to subscribers, in order (``(kind, record)``).
    """

    def __init__(
        self,
        run_dir: str | os.PathLike | None = None,
        root: str | os.PathLike | None = None,
        model_name: str | None = None,
        dataset: str | None = None,
    ) -> None:
        self._run_dir = Path(run_dir) if run_dir is not None else None
        self.root, self.model_name, self.dataset = root, model_name, dataset
        self.dir: Path | None = None
        self.id: str | None = None
        self.records: list[tuple[str, dict]] = []
        self._listeners: list[Listener] = []
        self._ledger: RunLedger | None = None
        self._t_log = self._t0 = 0.0
        self._tokens_at_log = 0
        self._step_at_log = 0
        self._max_steps = 0
        self._plans_written = False

    # ---------------------------------------------------------------------------------- subscribers
    def subscribe(self, fn: Listener) -> Callable[[], None]:
        """Call ``fn(kind, record)`` for every step / eval / end record; returns an unsubscribe function."""
        self._listeners.append(fn)
        return lambda: self._listeners.remove(fn) if fn in self._listeners else None

    def _emit(self, kind: str, record: dict) -> None:
        self.records.append((kind, record))
        for fn in list(self._listeners):
            fn(kind, record)

    # ---------------------------------------------------------------------------------- Trainer events
    def on_train_begin(self, args, state, control, model=None, **kwargs):
        settings = _adapter_settings(model) if model is not None else {"backend": "trainer"}
        self.dir = self._run_dir or new_run_dir(settings["backend"], self.root)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.id = self.dir.name
        self._ledger = RunLedger(self.dir)
        self._ledger._opened = True  # the folder exists now: a deletion under the run stops its writes
        name = self.model_name or getattr(getattr(model, "config", None), "_name_or_path", None)
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad) if model is not None else 0
        total = sum(p.numel() for p in model.parameters()) if model is not None else 0
        self._max_steps = int(state.max_steps or args.max_steps or 0)
        config = {
            "model": name,
            "dataset": self.dataset,
            **settings,
            "lr": args.learning_rate,
            "weight_decay": args.weight_decay,
            "steps": self._max_steps,
            "batch_size": args.per_device_train_batch_size,
            "grad_accum": args.gradient_accumulation_steps,
            "warmup_steps": args.warmup_steps,
            "schedule": str(getattr(args.lr_scheduler_type, "value", args.lr_scheduler_type)),
            "max_grad_norm": args.max_grad_norm,
            "seed": args.seed,
            "output_dir": args.output_dir,
        }
        _ACTIVE.add(self.id)
        write_json(
            self.dir / "config.json",
            {
                "id": self.id,
                "config": config,
                "versions": _versions(),
                "plans": [],
                "trainable_params": trainable,
                "total_params": total,
            },
        )
        self._ledger._set_status(
            status="running", pid=os.getpid(), host=socket.gethostname(), started=time.time(), message=None
        )
        self._t0 = self._t_log = time.perf_counter()
        self._tokens_at_log = int(getattr(state, "num_input_tokens_seen", 0) or 0)
        self._step_at_log = state.global_step
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()

    def on_log(self, args, state, control, logs=None, model=None, **kwargs):
        logs = logs or {}
        if self._ledger is None or "loss" not in logs:  # eval and end-of-training summaries come elsewhere
            return
        now = time.perf_counter()
        tokens = int(getattr(state, "num_input_tokens_seen", 0) or 0)
        steps = max(state.global_step - self._step_at_log, 1)
        dt = now - self._t_log
        record = {
            "step": state.global_step,
            "train_loss": float(logs["loss"]),
            "lr": float(logs.get("learning_rate", math.nan)),
            "grad_norm": float(logs.get("grad_norm", math.nan)),
            "tokens": tokens,
            # tokens/s needs TrainingArguments(include_num_input_tokens_seen=True); NaN without it
            "tokens_per_s": (tokens - self._tokens_at_log) / dt if tokens and dt > 0 else math.nan,
            "step_s": dt / steps,
            "elapsed_s": now - self._t0,
            "peak_mem_bytes": torch.cuda.max_memory_allocated() if torch.cuda.is_available() else None,
        }
        self._t_log, self._tokens_at_log, self._step_at_log = now, tokens, state.global_step
        self._ledger._append("metrics.jsonl", {"kind": "step", **record})
        if model is not None and not self._plans_written:  # plans exist once a step ran every layer
            self._plans_written = True
            self._write_plans(model)
        self._emit("step", record)

    def _write_plans(self, model: torch.nn.Module) -> None:
        plans = plan_table(model)
        if len(plans):
            cfg = read_json_dict(self.dir / "config.json")
            cfg["plans"] = json.loads(plans.to_json(orient="records"))
            write_json(self.dir / "config.json", cfg)

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        metrics = metrics or {}
        if self._ledger is None or "eval_loss" not in metrics:
            return
        loss = float(metrics["eval_loss"])
        record = {
            "step": state.global_step,
            "val_loss": loss,
            "perplexity": math.exp(loss) if loss < 700 else math.inf,
            "accuracy": metrics.get("eval_accuracy"),
        }
        self._ledger._append("metrics.jsonl", {"kind": "eval", **record})
        self._emit("eval", record)

    def on_save(self, args, state, control, **kwargs):
        if self._ledger is not None:
            path = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            self._ledger._set_status(checkpoint_step=state.global_step, checkpoint_dir=str(path))

    def on_train_end(self, args, state, control, **kwargs):
        if self._ledger is None:
            return
        stopped = bool(self._max_steps) and state.global_step < self._max_steps
        evals = [r for k, r in self.records if k == "eval"]
        losses = [r["train_loss"] for k, r in self.records if k == "step"]
        diverged = any(not math.isfinite(x) for x in losses)
        record = {
            "status": "diverged" if diverged else ("stopped" if stopped else "finished"),
            "step": state.global_step,
            "elapsed_s": time.perf_counter() - self._t0,
            "val_loss": evals[-1]["val_loss"] if evals else None,
            "message": "a non-finite training loss was logged: lower the learning rate" if diverged else None,
        }
        self._ledger._set_status(**record, ended=time.time())
        _ACTIVE.discard(self.id)
        self._emit("end", record)
