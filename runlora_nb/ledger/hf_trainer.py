"""Record a Hugging Face ``Trainer`` (or TRL ``SFTTrainer``) run into the run ledger, live.

:class:`LedgerCallback` is a plain ``transformers.TrainerCallback``: pass it in ``callbacks=[...]`` and the run
becomes a folder of the ledger (:mod:`.runs`) like any fine-tune of the engine: ``config.json`` (the trainer's
settings, the adapter's rank and alpha, library versions, the chain plan of every RunLoRA layer), one
``metrics.jsonl`` line per logged step (train loss, lr, grad norm, tokens/s, step time, peak memory) and per
evaluation (val loss, perplexity), and ``status.json`` (running → finished / stopped, or interrupted / failed
when ``trainer.train()`` raises). So ``list_runs()``, ``compare([...])`` and ``runlora-nb runs`` show Trainer
runs beside the engine's.

It is also an event source: :meth:`LedgerCallback.subscribe` gets ``("step" | "eval" | "end", record)`` calls
in the training thread; the widget view ``runlora_nb.widgets.trainer_monitor`` draws them live. No widgets here.
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import os
import sys
import time
import weakref
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from transformers import TrainerCallback

from ..common.metrics import perplexity
from ..integrations.inject import runlora_layers
from ..integrations.plans import plan_table
from ..train.events import EndEvent
from ..train.history import History
from .folders import new_run_dir
from .writer import RunWriter

__all__ = ["LedgerCallback"]

Listener = Callable[[str, dict], None]


def _targets(value: Any) -> Any:
    """A target_modules setting as JSON: a string as it is, a set or tuple as a sorted list."""
    if value is None or isinstance(value, str):
        return value
    return sorted(str(v) for v in value)


def _find_config(model: torch.nn.Module, attr: str) -> Any:
    """``attr`` of ``model`` or of the model it wraps (PEFT's ``base_model.model``), or None."""
    for m in (
        model,
        getattr(model, "base_model", None),
        getattr(getattr(model, "base_model", None), "model", None),
    ):
        if m is not None and attr in getattr(m, "__dict__", {}):
            return m.__dict__[attr]
    return None


def _adapter_settings(model: torch.nn.Module) -> dict[str, Any]:
    """Backend, rank, alpha, dropout and targets of the LoRA layers in ``model`` (RunLoRA first, then PEFT's).

    Rank, alpha and dropout come from the layers themselves (what trains); the targets (what was asked for)
    from the model's ``runlora_config`` or PEFT's ``peft_config``, else the wrapped layers' paths.
    """
    layers = list(runlora_layers(model))
    if layers:
        first = layers[0][1]
        cfg = _find_config(model, "runlora_config")
        targets = getattr(cfg, "target_modules", None) or [path for path, _ in layers]
        return {"backend": "runlora", "r": first.r, "alpha": first.alpha, "dropout": first.dropout,
                "targets": _targets(targets), "modules": len(layers)}  # fmt: skip
    paths = []
    found = None
    for path, module in model.named_modules():
        r = getattr(module, "r", None)
        if isinstance(r, dict) and r and hasattr(module, "lora_A"):  # a PEFT LoRA layer
            paths.append(path)
            if found is None:
                name = next(iter(r))
                drop = module.lora_dropout[name]
                found = {
                    "backend": "peft",
                    "r": r[name],
                    "alpha": module.lora_alpha[name],
                    "dropout": float(getattr(drop, "p", 0.0)),
                    "name": name,
                }
    if found is not None:
        peft_config = getattr(model, "peft_config", None)
        cfg = peft_config.get(found.pop("name")) if isinstance(peft_config, dict) else None
        targets = getattr(cfg, "target_modules", None) or paths
        return {**found, "targets": _targets(targets), "modules": len(paths)}
    return {"backend": "trainer", "r": None, "alpha": None, "dropout": None, "targets": None, "modules": 0}


def _model_name(model: torch.nn.Module | None) -> str | None:
    """What the model is: its zoo name, else the folder or hub id it was loaded from, else its type.

    :func:`~runlora_nb.assets.zoo.load_model` tags zoo models with ``runlora_zoo_name`` (a packaged one's
    ``_name_or_path`` is its cache folder); PEFT's wrapper passes the attribute through.
    """
    if model is None:
        return None
    with contextlib.suppress(AttributeError):
        if isinstance(model.runlora_zoo_name, str) and model.runlora_zoo_name:
            return model.runlora_zoo_name
    config = getattr(model, "config", None)
    name = getattr(config, "_name_or_path", None)
    if name:
        return str(name)
    base = getattr(_find_config(model, "runlora_config"), "base_model_name_or_path", None)
    if base:
        return str(base)
    model_type = getattr(config, "model_type", None)
    return f"{model_type} (built in memory)" if model_type else type(model).__name__


def _calling_trainer() -> Any:
    """The ``transformers.Trainer`` whose method is on the call stack (the one calling a callback), or None."""
    from transformers import Trainer

    frame = sys._getframe(1)
    for _ in range(30):
        if frame is None:
            return None
        obj = frame.f_locals.get("self")
        if isinstance(obj, Trainer):
            return obj
        frame = frame.f_back
    return None


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
        history: the same run as a :class:`~runlora_nb.train.History` (the tables and metrics of an engine run).
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
        self.history = History()
        self._listeners: list[Listener] = []
        self._ledger: RunWriter | None = None
        self._t_log = self._t0 = 0.0
        self._tokens_at_log = 0
        self._step_at_log = 0
        self._max_steps = 0
        self._plans_written = False
        self._ended = True  # no run open: nothing to mark when train() raises
        self._eval_s = 0.0  # time spent evaluating since the last logged step: not training throughput
        self._eval_t0: float | None = None
        self._hooked: weakref.WeakSet = weakref.WeakSet()
        self._state: Any = None  # the Trainer's TrainerState (updated in place): the step reached

    # ---------------------------------------------------------------------------------- subscribers
    def subscribe(self, fn: Listener) -> Callable[[], None]:
        """Call ``fn(kind, record)`` for every step / eval / end record; returns an unsubscribe function."""
        self._listeners.append(fn)
        return lambda: self._listeners.remove(fn) if fn in self._listeners else None

    def _emit(self, kind: str, record: dict) -> None:
        self.records.append((kind, record))
        if kind in ("step", "eval"):
            self.history.record(kind, record)
        elif kind == "end":
            status = record.get("status")
            self.history.on_end(EndEvent(
                int(record.get("step", 0)), status == "stopped", None, float(record.get("elapsed_s", math.nan)),
                record.get("val_loss"), record.get("message"), status == "diverged"))  # fmt: skip
        for fn in list(self._listeners):
            fn(kind, record)

    # ---------------------------------------------------------------------------------- interruptions
    def _hook(self, trainer: Any) -> None:
        """Wrap ``trainer.train`` so that a run it ends by raising is marked, not left "running".

        The Trainer calls ``on_train_end`` only when training completes: a Ctrl-C (KeyboardInterrupt) or an
        error skips it, and in a notebook the kernel (the run's pid) lives on, so neither an ``atexit`` hook
        nor the ledger's dead-pid check would ever see the run end. ``trainer.train()`` is the one call every
        run goes through, so a ``try/except`` around it sees every way out. Installed when the Trainer is
        built with this callback (``on_init_end``); for a callback added later with ``add_callback``, at its
        first ``on_train_begin`` (that first run falls back to the dead-pid check).
        """
        if trainer is None or trainer in self._hooked:
            return
        self._hooked.add(trainer)
        original = trainer.train

        @functools.wraps(original)
        def train(*args, **kwargs):
            try:
                return original(*args, **kwargs)
            except BaseException as err:
                self._abort(err)
                raise

        trainer.train = train

    def _abort(self, err: BaseException) -> None:
        """Mark the open run interrupted (Ctrl-C) or failed (an error), as the engine's runs are."""
        if self._ended or self._ledger is None:
            return
        self._ended = True
        interrupted = isinstance(err, KeyboardInterrupt)
        record = {
            "status": "interrupted" if interrupted else "failed",
            "step": int(getattr(self._state, "global_step", self._step_at_log)),
            "elapsed_s": time.perf_counter() - self._t0,
            "val_loss": next((r["val_loss"] for k, r in reversed(self.records) if k == "eval"), None),
            "message": (
                "interrupted (KeyboardInterrupt); resume with trainer.train(resume_from_checkpoint=True) if a "
                "checkpoint was saved"
                if interrupted
                else f"{type(err).__name__}: {err}"[:500]
            ),
        }
        with contextlib.suppress(Exception):  # the original exception is what the user must see
            self._ledger.close(**record)
        with contextlib.suppress(Exception):
            self._emit("end", record)

    # ---------------------------------------------------------------------------------- Trainer events
    def on_init_end(self, args, state, control, **kwargs):
        self._hook(_calling_trainer())

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self._hook(_calling_trainer())
        self.records, self.history = [], History()  # one run per train() call
        settings = (
            _adapter_settings(model)
            if model is not None
            else {
                "backend": "trainer",
                "r": None,
                "alpha": None,
                "dropout": None,
                "targets": None,
                "modules": 0,
            }
        )
        self.dir = self._run_dir or new_run_dir(settings["backend"], self.root)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.id = self.dir.name
        self._ledger = RunWriter(self.dir)
        name = self.model_name or _model_name(model)
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad) if model is not None else 0
        total = sum(p.numel() for p in model.parameters()) if model is not None else 0
        self._max_steps = int(state.max_steps or args.max_steps or 0)
        config = {
            "model": name,
            "dataset": self.dataset,
            **settings,
            "adapter": {k: settings[k] for k in ("r", "alpha", "dropout", "targets")},
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
        self._ledger.open(config, {"trainable_params": trainable, "total_params": total}, started=time.time())
        self._t0 = self._t_log = time.perf_counter()
        self._tokens_at_log = int(getattr(state, "num_input_tokens_seen", 0) or 0)
        self._step_at_log = state.global_step
        self._eval_s, self._eval_t0 = 0.0, None
        self._ended, self._state = False, state
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()

    def on_log(self, args, state, control, logs=None, model=None, **kwargs):
        logs = logs or {}
        if self._ledger is None or "loss" not in logs:  # eval and end-of-training summaries come elsewhere
            return
        now = time.perf_counter()
        tokens = int(getattr(state, "num_input_tokens_seen", 0) or 0)
        steps = max(state.global_step - self._step_at_log, 1)
        dt = max(now - self._t_log - self._eval_s, 0.0)  # training time only: evaluations are left out
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
        self._eval_s = 0.0
        self._ledger.append_step(record)
        if model is not None and not self._plans_written:  # plans exist once a step ran every layer
            self._plans_written = True
            self._write_plans(model)
        self._emit("step", record)

    def _write_plans(self, model: torch.nn.Module) -> None:
        plans = plan_table(model)
        if len(plans):
            self._ledger.write_plans(json.loads(plans.to_json(orient="records")))

    def on_prediction_step(self, args, state, control, **kwargs):
        if self._eval_t0 is None:  # the first batch of an evaluation: it started about now
            self._eval_t0 = time.perf_counter()

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        metrics = metrics or {}
        # the Trainer times the whole evaluation (eval_runtime); the prediction steps bound it otherwise
        runtime = metrics.get("eval_runtime")
        if isinstance(runtime, (int, float)) and math.isfinite(runtime) and runtime >= 0:
            self._eval_s += float(runtime)
        elif self._eval_t0 is not None:
            self._eval_s += time.perf_counter() - self._eval_t0
        self._eval_t0 = None
        if self._ledger is None or "eval_loss" not in metrics:
            return
        loss = float(metrics["eval_loss"])
        record = {
            "step": state.global_step,
            "val_loss": loss,
            "perplexity": perplexity(loss),
            "accuracy": metrics.get("eval_accuracy"),
        }
        self._ledger.append_eval(record)
        self._emit("eval", record)

    def on_save(self, args, state, control, **kwargs):
        if self._ledger is not None:
            path = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            self._ledger.set_status(checkpoint_step=state.global_step, checkpoint_dir=str(path))

    def on_train_end(self, args, state, control, **kwargs):
        if self._ledger is None:
            return
        self._ended = True
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
        self._ledger.close(**record)
        self._emit("end", record)
