"""Fine-tuning engine: a small, event-driven training loop that never imports widgets.

State and events are separate from outputs (livelossplot / minGPT style): :class:`FineTuner` emits
``on_start``, ``on_sample``, ``on_step``, ``on_eval`` and ``on_end`` to its callbacks, and whoever listens —
a progress printer, a plotly panel, a test — draws. :meth:`FineTuner.stop` may be called from a callback or
another thread; the loop checks it between steps, saves the adapter and ends cleanly. The same config and
seed give the same run.

Every run is recorded by a :class:`~runlora_nb.tuning.runs.RunLedger` callback into a run folder (config,
metrics, samples, status, checkpoints every ``checkpoint_every`` steps and at Stop); :meth:`FineTuner.resume`
continues an interrupted or stopped run from its last checkpoint. A NaN/inf loss or gradient ends the run as
*diverged* without saving the adapter.
"""

from __future__ import annotations

import contextlib
import math
import threading
import time
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from torch import nn

from ..assets.hf import greedy_continuation
from ..common.sysmem import peak_rss_bytes
from ..integrations.plans import plan_table
from .config import FineTuneConfig
from .events import CheckpointEvent, EndEvent, EvalEvent, SampleEvent, StartEvent, StepEvent, TrainResult

__all__ = ["DivergedError", "FineTuner", "enable_checkpointing"]


class DivergedError(ValueError):
    """The loss or the gradient norm became NaN/inf (the run ends as *diverged*)."""


# ------------------------------------------------------------------------------------------------- helpers


def enable_checkpointing(model: nn.Module) -> None:
    """Turn on activation (gradient) checkpointing with transformers 5's name, or 4's."""
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def _lr_factor(step: int, cfg: FineTuneConfig) -> float:
    """Multiplier of cfg.lr at optimizer step ``step`` (0-based)."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return 1.0
    progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    if cfg.schedule == "linear":
        return max(0.0, 1.0 - progress)
    return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))


def _task_of(cfg: FineTuneConfig) -> tuple[str, str]:
    """(data task, model task)."""
    from ..assets.datasets import dataset_kind

    task = cfg.task or ("causal-lm" if dataset_kind(cfg.dataset) == "text" else "instruction")
    return task, ("sequence-classification" if task == "classification" else "causal-lm")


# ------------------------------------------------------------------------------------------------- trainer


class FineTuner:
    """Fine-tune a zoo model with LoRA (runlora_nb or PEFT) and emit events.

    Args:
        config: the run.
        callbacks: :class:`Callback` objects (or anything with some of the ``on_*`` methods).
        model: optional prepared (model, tokenizer) pair to train instead of loading ``config.model`` (its
            adapters are added by the trainer).
        resume: a run id (or run folder) to continue from its last checkpoint; ``config`` must be that run's
            (use :meth:`resume` to read it from the run).
        ledger: record the run into the run ledger (``config.runs_dir``); False: no run folder.

    Raises:
        ValueError: ``checkpoint_every`` < 0, or ``resume`` names a run without a checkpoint, a folder that is
            not a ledger run, or a run whose process is still running.

    Example:
        >>> tuner = FineTuner(FineTuneConfig(model="tiny-llama", steps=20), [PrintProgress()])
        >>> result = tuner.run()
    """

    def __init__(
        self,
        config: FineTuneConfig,
        callbacks: Sequence[Any] = (),
        model: tuple[nn.Module, Any] | None = None,
        *,
        resume: str | Path | None = None,
        ledger: bool = True,
    ) -> None:
        from .checkpoint import check_config, load_checkpoint
        from .guards import UniformLossGuard
        from .runs import check_not_running, run_dir

        if config.checkpoint_every < 0:
            raise ValueError(
                f"FineTuner: checkpoint_every must be >= 0 (0: only at Stop), got {config.checkpoint_every}"
            )
        self.config = config
        self.callbacks: list[Any] = [UniformLossGuard(), *callbacks]
        self.run_dir: Path | None = run_dir(resume, config.runs_dir) if resume is not None else None
        if self.run_dir is not None:
            check_not_running(self.run_dir)  # before anything is read or written: one writer per run folder
        self._resume_state = load_checkpoint(self.run_dir) if self.run_dir is not None else None
        if self._resume_state is not None:  # before on_start rewrites config.json with this config
            check_config(config, self._resume_state)
        self._ledger = ledger or resume is not None
        self._data_pos = (0, 0)  # (epoch, next batch index in it)
        self._saved_bytes: int | None = None
        self._given = model
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._loop_lock = threading.Lock()
        self._in_loop = False  # run()'s loop owns the model (one trainer loop at a time)
        self.model: nn.Module | None = None
        self.tokenizer = None
        self.history = TrainResult(config)
        self.step = 0
        self._t0: float | None = None  # origin of elapsed_s (a resumed run shifts it back by its time)
        self.running = False
        self.label_names: tuple[str, ...] = ()

    @classmethod
    def resume(
        cls, run_id: str | Path, callbacks: Sequence[Any] = (), runs_dir: str | None = None
    ) -> FineTuner:
        """A tuner that continues run ``run_id`` (config read from its folder) from its last checkpoint.

        Raises:
            ValueError: no such run, a run still running, or a run whose ``config.json`` is damaged (resuming
                with default settings would train another model and overwrite the run's record).
        """
        from .runs import check_not_running, load_run, saved_config

        run = load_run(run_id, runs_dir)
        check_not_running(run.path)
        return cls(saved_config(run.path), callbacks, resume=run.path)

    def state_dict(self) -> dict[str, Any]:
        """The resumable state between steps (see :func:`runlora_nb.tuning.checkpoint.trainer_state`)."""
        from .checkpoint import trainer_state

        return trainer_state(self)

    # -------------------------------------------------------------------------------------------- control
    def add_callback(self, callback: Any) -> None:
        self.callbacks.append(callback)

    def stop(self) -> None:
        """Ask the loop to stop after the current step (thread-safe; the adapter is saved)."""
        self._stop.set()

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    @property
    def plans(self) -> pd.DataFrame:
        """Per-module chain plans in use (runlora backend, after the first step); empty for PEFT."""
        return plan_table(self.model) if self.model is not None else pd.DataFrame()

    def start(self) -> threading.Thread:
        """Run in a background thread (the Jupyter kernel stays responsive); returns the thread."""
        with self._loop_lock:
            if self.running or self._in_loop:
                raise RuntimeError("FineTuner: already running; call stop() and wait for it first")
            self._thread = threading.Thread(target=self._run_quietly, name="runlora-finetune", daemon=True)
            self.running = True
        self._thread.start()
        return self._thread

    def join(self, timeout: float | None = None) -> TrainResult:
        if self._thread is not None:
            self._thread.join(timeout)
        return self.history

    def _run_quietly(self) -> None:
        # errors are reported through on_end(error=...): a background thread has nowhere to raise to
        with contextlib.suppress(Exception):
            self.run()

    def _emit(self, name: str, event: Any) -> None:
        for cb in list(self.callbacks):
            fn = getattr(cb, name, None)
            if fn is not None:
                fn(self, event)

    # -------------------------------------------------------------------------------------------- setup
    def prepare(self) -> None:
        """Load the model and data, add the adapters (idempotent)."""
        if self.model is not None:
            return
        from ..assets.tokenized import make_dataset
        from ..assets.zoo import load_model

        cfg = self.config
        data_task, model_task = _task_of(cfg)
        torch.manual_seed(cfg.seed)
        if self._given is not None:
            model, tok = self._given
        else:
            model, tok = load_model(
                cfg.model, dtype=cfg.dtype, quantization=cfg.quantization, task=model_task
            )
        self.train_set = make_dataset(cfg.dataset, tok, cfg.seq_len, "train", cfg.seed, task=data_task)
        self.val_set = make_dataset(cfg.dataset, tok, cfg.seq_len, "validation", cfg.seed, task=data_task)
        if len(self.train_set) == 0:
            raise ValueError(
                f"FineTuner: dataset {cfg.dataset!r} gives no training rows at seq_len={cfg.seq_len}"
            )
        self.label_names = self.train_set.label_names
        if model_task == "sequence-classification" and model.config.num_labels != len(self.label_names):
            model, tok = load_model(
                cfg.model,
                dtype=cfg.dtype,
                quantization=cfg.quantization,
                task=model_task,
                num_labels=len(self.label_names),
            )
        if cfg.gradient_checkpointing:
            enable_checkpointing(model)
        torch.manual_seed(cfg.seed)  # adapter init depends on the seed only, not on what loading consumed
        self.model = self._add_adapters(model.train())
        self.tokenizer = tok
        self._params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self._params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda s: _lr_factor(s, cfg))

    def _add_adapters(self, model: nn.Module) -> nn.Module:
        cfg = self.config
        targets = list(cfg.targets) if isinstance(cfg.targets, tuple) else cfg.targets
        if cfg.backend == "runlora":
            from ..integrations.inject import apply_runlora

            return apply_runlora(
                model, r=cfg.r, alpha=cfg.alpha, dropout=cfg.dropout, target_modules=targets, chain=cfg.chain
            )
        import peft

        from ..integrations.inject import check_rank, find_targets

        # PEFT drops target names that match nothing and allocates any rank: refuse both as apply_runlora does
        check_rank(model, find_targets(model, targets), cfg.r)
        if cfg.quantization:
            from ..core.quant import guard_cpu_repack

            guard_cpu_repack(model)
        lcfg = peft.LoraConfig(
            r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, target_modules=targets
        )
        from ..integrations.inject import get_peft_model

        return get_peft_model(model, lcfg)

    # -------------------------------------------------------------------------------------------- loop
    def _batches(self) -> Iterator[dict[str, torch.Tensor]]:
        from ..assets.tokenized import batches

        epoch, skip = self._data_pos
        while True:
            it = batches(
                self.train_set, self.config.batch_size, seed=self.config.seed + epoch, drop_last=True
            )
            for k, batch in enumerate(it):
                if k >= skip:
                    self._data_pos = (epoch, k + 1)
                    yield batch
            epoch, skip = epoch + 1, 0
            if len(self.train_set) < self.config.batch_size:
                raise ValueError(
                    f"FineTuner: {len(self.train_set)} training rows cannot fill batch_size={self.config.batch_size}"
                )

    def _loss(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.model(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"]
        )
        return out.loss, out.logits

    @torch.no_grad()
    def evaluate(self) -> EvalEvent:
        """Validation loss (and perplexity, or accuracy for classification) on ``eval_batches`` batches."""
        from ..assets.tokenized import batches

        self.model.eval()
        losses, correct, seen = [], 0, 0
        try:
            it = batches(self.val_set, self.config.batch_size, shuffle=False)
            for _, batch in zip(range(self.config.eval_batches), it):
                loss, logits = self._loss(batch)
                losses.append(float(loss))
                if self.label_names:
                    correct += int((logits.argmax(-1) == batch["labels"]).sum())
                    seen += len(batch["labels"])
        finally:
            self.model.train()
        val = sum(losses) / len(losses) if losses else math.nan
        acc = correct / seen if seen else None
        return EvalEvent(self.step, val, math.exp(min(val, 50.0)), acc)

    @torch.no_grad()
    def generate(self, prompts: Sequence[str], max_new_tokens: int | None = None) -> list[str]:
        """Greedy continuations of ``prompts`` (causal LM tasks); the model is back in train mode after."""
        self.prepare()
        if self.label_names:
            return []
        tok, n = self.tokenizer, max_new_tokens or self.config.sample_tokens
        self.model.eval()
        try:
            texts = []
            for prompt in prompts:
                texts.append(greedy_continuation(self.model, tok, dict(tok(prompt, return_tensors="pt")), n))
            return texts
        finally:
            self.model.train()

    def _sample(self, stage: str) -> None:
        prompts = self.config.sample_prompts
        if not prompts or self.label_names:
            return
        for prompt, text in zip(prompts, self.generate(prompts)):
            event = SampleEvent(stage, prompt, text)
            self.history.samples.append(event)
            self._emit("on_sample", event)

    def _eval(self) -> EvalEvent:
        event = self.evaluate()
        self.history.evals.append(event)
        self._emit("on_eval", event)
        return event

    def save_adapter(self, directory: str | Path | None = None) -> Path:
        """Save the adapter in PEFT's format (default: ``config.output_dir``, else the run folder's ``adapter/``).

        Raises:
            DivergedError: the adapter holds NaN/inf values (it is not written).
        """
        from ..integrations.adapters import save_adapter
        from .checkpoint import adapter_is_finite
        from .runs import new_run_dir

        cfg = self.config
        if not adapter_is_finite(self):
            raise DivergedError(f"FineTuner: the adapter holds NaN/inf values at step {self.step}; not saved")
        if directory is None and cfg.output_dir is None and self.run_dir is not None:
            directory = self.run_dir / "adapter"
        if directory is None:
            directory = cfg.output_dir or new_run_dir(cfg.backend, cfg.runs_dir)
        return save_adapter(self.model, directory)

    def _open_run(self) -> None:
        """Subscribe the run ledger (a fresh unique run folder, or the resumed one)."""
        from .runs import RunLedger, new_run_dir

        if not self._ledger or any(isinstance(cb, RunLedger) for cb in self.callbacks):
            return
        if self.run_dir is None:
            self.run_dir = new_run_dir(self.config.backend, self.config.runs_dir)
        step = self._resume_state["step"] if self._resume_state is not None else None
        self.callbacks.append(RunLedger(self.run_dir, resume_step=step))

    def _checkpoint(self) -> None:
        from .checkpoint import adapter_is_finite

        if adapter_is_finite(self):  # a non-finite state is never written over the last good one
            self._emit("on_checkpoint", CheckpointEvent(self.step))
            self._checkpoint_step = self.step

    def run(self) -> TrainResult:
        """Train for ``config.steps`` steps (or until :meth:`stop`), emitting events; returns the history.

        A NaN/inf loss or gradient ends the run early as diverged (``history.end.diverged``, a RuntimeWarning,
        no adapter saved; the last good checkpoint stays). Other errors are re-raised after ``on_end``.
        Calling it again after a stop continues from the current step without re-evaluating a step that was
        already evaluated.

        Raises:
            RuntimeError: this trainer is already training (a :meth:`start` thread or another ``run()``): two
                loops would step the same model and optimizer at once.
        """
        with self._loop_lock:
            started = self._thread is not None and threading.current_thread() is self._thread
            if self._in_loop or (self.running and not started):
                raise RuntimeError(
                    f"FineTuner.run: this trainer is already training (step {self.step} of "
                    f"{self.config.steps}, in thread {self._thread.name if self._thread else 'another call'}); "
                    "two loops would update the same model at once. Call stop() and join() first, then run()."
                )
            self._in_loop = True
        try:
            return self._run_loop()
        finally:
            with self._loop_lock:
                self._in_loop = False
                self.running = False

    def _run_loop(self) -> TrainResult:
        cfg = self.config
        self.running = True
        self._stop.clear()
        t0 = self._t0 = time.perf_counter()
        val: float | None = None
        self._checkpoint_step: int | None = None
        try:
            self._open_run()
            self.prepare()
            from ..integrations.inject import trainable_parameters

            counts = trainable_parameters(self.model)
            self._emit(
                "on_start",
                StartEvent(cfg, counts.trainable, counts.total, len(self.train_set), len(self.val_set)),
            )
            if self._resume_state is not None:
                from .checkpoint import restore_trainer, saved_elapsed

                restore_trainer(self, self._resume_state)  # RNG states last: the next step is the lost one
                # elapsed_s continues from the time the run had already spent up to its checkpoint
                t0 -= saved_elapsed(self._resume_state)
                self._t0 = t0
                self._resume_state, self._checkpoint_step = None, self.step
                val = self.history.evals[-1].val_loss if self.history.evals else None
            elif self.history.evals and self.history.evals[-1].step == self.step:
                val = self.history.evals[-1].val_loss  # a restart after stop(): this step was evaluated
            else:
                self._sample("before")
                val = self._eval().val_loss
            batches = self._batches()
            while self.step < cfg.steps and not self._stop.is_set():
                self._train_step(batches, t0)
                if cfg.eval_interval and self.step % cfg.eval_interval == 0 and self.step < cfg.steps:
                    val = self._eval().val_loss
                if cfg.checkpoint_every and self.step % cfg.checkpoint_every == 0 and self.step < cfg.steps:
                    self._checkpoint()
            if self._stop.is_set() and self.step < cfg.steps and self._checkpoint_step != self.step:
                self._checkpoint()  # Stop keeps a resumable state
            if not self.history.evals or self.history.evals[-1].step != self.step:
                val = self._eval().val_loss
            self._sample("after")
            adapter = str(self.save_adapter())
            end = EndEvent(self.step, self._stop.is_set(), adapter, time.perf_counter() - t0, val)
        except DivergedError as err:
            kept = (
                f"; the last good checkpoint (step {self._checkpoint_step}) stays in {self.run_dir}"
                if self._checkpoint_step is not None
                else ""
            )
            msg = f"{err}{kept}"
            end = EndEvent(self.step, self._stop.is_set(), None, time.perf_counter() - t0, val, msg, True)
            warnings.warn(msg, RuntimeWarning, stacklevel=2)
        except BaseException as err:  # KeyboardInterrupt too: listeners learn the run ended (then re-raised)
            end = EndEvent(
                self.step,
                self._stop.is_set(),
                None,
                time.perf_counter() - t0,
                val,
                f"{type(err).__name__}: {err}",
            )
            self.history.end = end
            self.running = False
            self._emit("on_end", end)
            raise
        self.history.end = end
        self.running = False
        self._emit("on_end", end)
        return self.history

    def _train_step(self, batches: Iterator[dict[str, torch.Tensor]], t0: float) -> None:
        cfg = self.config
        start = time.perf_counter()
        total, tokens = 0.0, 0
        for k in range(cfg.grad_accum):
            batch = next(batches)
            if self._saved_bytes is None and k == 0 and not cfg.gradient_checkpointing:
                from ..core.memory import SavedTensorRecorder

                with SavedTensorRecorder(
                    self.model
                ) as rec:  # once: every step saves the same (shapes are fixed)
                    loss, _ = self._loss(batch)
                self._saved_bytes = rec.activation_bytes()
            else:
                loss, _ = self._loss(batch)
            (loss / cfg.grad_accum).backward()
            total += float(loss.detach()) / cfg.grad_accum
            tokens += int(batch["attention_mask"].sum())
        norm = torch.nn.utils.clip_grad_norm_(self._params, cfg.max_grad_norm or float("inf"))
        lr = self.optimizer.param_groups[0]["lr"]
        if not (math.isfinite(total) and math.isfinite(float(norm))):
            self.optimizer.zero_grad(set_to_none=True)
            what = (
                f"the loss is {total}" if not math.isfinite(total) else f"the gradient norm is {float(norm)}"
            )
            raise DivergedError(
                f"FineTuner: the run diverged at step {self.step + 1}: {what} (lr {lr:.3g}); lower the "
                f"learning rate (e.g. lr={cfg.lr / 10:.3g}) or keep max_grad_norm on; the adapter was not saved"
            )
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        dt = time.perf_counter() - start
        event = StepEvent(
            self.step, total, lr, float(norm), tokens, tokens / dt, dt, time.perf_counter() - t0,
            self._saved_bytes, _peak_memory(),
        )  # fmt: skip
        self.history.steps.append(event)
        self._emit("on_step", event)


def _peak_memory() -> int:
    """Peak bytes so far: CUDA's allocator peak when CUDA is in use, else the process's peak RSS (since the last
    :func:`~runlora_nb.common.sysmem.reset_peak_rss`, e.g. the start of a sweep trial)."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        return int(torch.cuda.max_memory_allocated())
    return peak_rss_bytes()
