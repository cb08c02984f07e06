"""Fine-tuning engine: a small, event-driven training loop that never imports widgets or the run ledger.

State and events are separate from outputs (livelossplot / minGPT style): :class:`FineTuner` emits
``on_start``, ``on_sample``, ``on_step``, ``on_plans``, ``on_eval``, ``on_warning``, ``on_checkpoint`` and
``on_end`` to its callbacks; each receives the event alone. Whoever listens — a progress printer, a plotly
panel, the run ledger, a test — draws or records. :meth:`FineTuner.stop` may be called from a callback or
another thread; the loop checks it between steps, saves the adapter and ends cleanly. The same config and
seed give the same run.

The engine keeps no files but the adapter: a checkpoint is a :class:`~runlora_nb.train.state.TrainState`
carried by a :class:`~runlora_nb.train.events.CheckpointEvent`, and ``FineTuner(resume_from=state)``
continues from one. :mod:`runlora_nb.ledger` records runs and resumes them by id. A NaN/inf loss or gradient
ends the run as *diverged* without saving the adapter.
"""

from __future__ import annotations

import contextlib
import json
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
from ..assets.tokenized import batches, make_dataset
from ..assets.zoo import load_model
from ..common.metrics import perplexity
from ..common.sysmem import peak_rss_bytes
from ..core.memory import SavedTensorRecorder
from ..integrations.adapters import save_adapter
from ..integrations.inject import trainable_parameters
from ..integrations.plans import plan_table
from .config import FineTuneConfig
from .device import autocast_dtype, autocast_for, move_batch, peak_memory, resolve_device, to_device
from .distributed import env_rank, join_process_group, shard, sum_over_ranks, wrap_ddp
from .events import (
    CheckpointEvent,
    EndEvent,
    EvalEvent,
    PlansEvent,
    SampleEvent,
    StartEvent,
    StepEvent,
    WarningEvent,
)
from .guards import UniformLossGuard, vocab_size
from .history import History
from .metrics import batch_nll
from .setup import (
    adapter_is_finite,
    add_adapters,
    default_adapter_dir,
    enable_checkpointing,
    lr_factor,
    make_optimizer,
    task_of,
    trainable,
)
from .state import COMPARED_FIELDS, TrainState, check_config, rng_state, set_rng_state

__all__ = ["DivergedError", "FineTuner", "default_adapter_dir", "enable_checkpointing"]


class DivergedError(ValueError):
    """The loss or the gradient norm became NaN/inf (the run ends as *diverged*)."""


class FineTuner:
    """Fine-tune a zoo model with LoRA (runlora_nb or PEFT) and emit events.

    Args:
        config: the run.
        callbacks: :class:`~runlora_nb.train.events.Callback` objects (or anything with some of the ``on_*``
            methods); each ``on_*`` receives one event.
        model: optional prepared (model, tokenizer) pair to train instead of loading ``config.model`` (its
            adapters are added by the trainer).
        resume_from: a :class:`TrainState` (e.g. from :func:`~runlora_nb.train.checkpoint.load_checkpoint`) to
            continue from; ``config`` must be that run's.
        adapter_dir: where :meth:`save_adapter` writes when ``config.output_dir`` is None (default: a fresh
            folder from :func:`default_adapter_dir`). The run ledger passes its run folder's ``adapter/``.
        run_dir: the folder of this run's record, when :mod:`runlora_nb.ledger` records it; the engine only
            reports its name (``StartEvent.run_id``) and never writes there itself.

    Raises:
        ValueError: ``checkpoint_every`` < 0, or ``resume_from`` was written with another config.

    Example:
        >>> tuner = FineTuner(FineTuneConfig(model="tiny-llama", steps=20), [PrintProgress()])
        >>> history = tuner.run()
    """

    def __init__(
        self,
        config: FineTuneConfig,
        callbacks: Sequence[Any] = (),
        model: tuple[nn.Module, Any] | None = None,
        *,
        resume_from: TrainState | None = None,
        adapter_dir: str | Path | None = None,
        run_dir: str | Path | None = None,
    ) -> None:
        if config.checkpoint_every < 0:
            raise ValueError(
                f"FineTuner: checkpoint_every must be >= 0 (0: only at Stop), got {config.checkpoint_every}"
            )
        if resume_from is not None:
            check_config(config, resume_from)
        self.config = config
        self.history = History(config)
        self.callbacks: list[Any] = [self.history, *callbacks]
        self.adapter_dir = Path(adapter_dir) if adapter_dir is not None else None
        self.run_dir = Path(run_dir) if run_dir is not None else None
        self._resume_state = resume_from
        self._data_pos = (0, 0)  # (epoch, next batch index in it)
        self._saved_bytes: int | None = None
        self._given = model
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._loop_lock = threading.Lock()
        self._in_loop = False  # run()'s loop owns the model (one trainer loop at a time)
        self._guard: UniformLossGuard | None = None
        self._plans_sent = False
        self.model: nn.Module | None = None
        self.device: torch.device | None = None  # resolved from config.device by prepare()
        self._autocast: torch.dtype | None = None
        self.ranks = env_rank()  # a launcher's ranks; the process group opens in prepare()
        self.tokenizer = None
        self.step = 0
        self._t0: float | None = None  # origin of elapsed_s (a resumed run shifts it back by its time)
        self.running = False
        self.label_names: tuple[str, ...] = ()

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
    def resume_step(self) -> int | None:
        """The checkpoint's step this tuner will continue from (None: a fresh run, or already resumed)."""
        return self._resume_state.step if self._resume_state is not None else None

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

    def join(self, timeout: float | None = None) -> History:
        if self._thread is not None:
            self._thread.join(timeout)
        return self.history

    def _run_quietly(self) -> None:
        # errors are reported through on_end(error=...): a background thread has nowhere to raise to
        with contextlib.suppress(Exception):
            self.run()

    def _emit(self, name: str, event: Any) -> None:
        # under a launcher only rank 0 reports (one progress line, one run record); every rank keeps a history
        for cb in list(self.callbacks) if self.ranks.main else [self.history]:
            fn = getattr(cb, name, None)
            if fn is not None:
                fn(event)

    def _warn(self, message: str) -> None:
        self._emit("on_warning", WarningEvent(self.step, message))
        warnings.warn(message, RuntimeWarning, stacklevel=3)

    # -------------------------------------------------------------------------------------------- state
    def snapshot(self) -> TrainState:
        """Everything needed to continue exactly here (call between steps)."""
        t0 = self._t0
        elapsed = time.perf_counter() - t0 if t0 is not None else self._last_elapsed()
        return TrainState(
            step=self.step,
            config={k: getattr(self.config, k) for k in COMPARED_FIELDS},
            adapter={n: p.detach().to("cpu", copy=True) for n, p in trainable(self.model).items()},
            optimizer=self.optimizer.state_dict(),
            scheduler=self.scheduler.state_dict(),
            rng=rng_state(),
            data_pos=self._data_pos,
            elapsed_s=elapsed,
            history=self.history.to_dict(),
        )

    def _last_elapsed(self) -> float:
        return float(self.history.steps[-1].elapsed_s) if self.history.steps else 0.0

    def _restore(self, state: TrainState) -> None:
        """Put ``state`` back into the prepared model; the RNG states last, so the next step is the lost one."""
        params = trainable(self.model)
        if set(params) != set(state.adapter):
            missing = sorted(set(state.adapter) ^ set(params))[:4]
            raise ValueError(
                f"FineTuner: checkpoint adapter parameters differ from the model's (e.g. {missing})"
            )
        with torch.no_grad():
            for name, p in params.items():
                p.copy_(state.adapter[name])
        self.optimizer.load_state_dict(state.optimizer)
        self.scheduler.load_state_dict(state.scheduler)
        self.step = state.step
        self._data_pos = state.data_pos
        self.history.restore(state.history)
        set_rng_state(state.rng)

    # -------------------------------------------------------------------------------------------- setup
    def prepare(self) -> None:
        """Load the model and data, add the adapters (idempotent)."""
        if self.model is not None:
            return
        cfg = self.config
        self.ranks, self.device = join_process_group(resolve_device(cfg.device))
        data_task, model_task = task_of(cfg)
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
            model, tok = load_model(cfg.model, dtype=cfg.dtype, quantization=cfg.quantization,
                                    task=model_task, num_labels=len(self.label_names))  # fmt: skip
        if cfg.gradient_checkpointing:
            enable_checkpointing(model)
        torch.manual_seed(cfg.seed)  # adapter init depends on the seed only, not on what loading consumed
        # adapters are initialised where the model was loaded (the CPU's generator), then moved: a run on a GPU
        # starts from the same A as one on the CPU
        self.model = to_device(add_adapters(model.train(), cfg), self.device)
        self._autocast = autocast_dtype(self.device, cfg.autocast, cfg.dtype)
        self._train_model = wrap_ddp(self.model, self.device, self.ranks)  # the model itself on one process
        self.tokenizer = tok
        self._params = list(trainable(self.model).values())
        self.optimizer = make_optimizer(self.model, cfg)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda s: lr_factor(s, cfg))

    # -------------------------------------------------------------------------------------------- loop
    def _batches(self) -> Iterator[dict[str, torch.Tensor]]:
        epoch, skip = self._data_pos
        rows = self.config.batch_size * self.ranks.world  # the global batch, drawn as one process would
        while True:
            it = batches(self.train_set, rows, seed=self.config.seed + epoch, drop_last=True)
            for k, batch in enumerate(it):
                if k >= skip:
                    self._data_pos = (epoch, k + 1)
                    yield shard(batch, self.ranks)
            epoch, skip = epoch + 1, 0
            if len(self.train_set) < rows:
                raise ValueError(
                    f"FineTuner: {len(self.train_set)} training rows cannot fill batch_size={self.config.batch_size}"
                    f" on {self.ranks.world} process(es)"
                )

    def _loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        batch = move_batch(batch, self.device)
        with autocast_for(self.device, self._autocast):
            out = self._train_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                             labels=batch["labels"])  # fmt: skip
        return out.loss

    def evaluate(self) -> EvalEvent:
        """Token-weighted validation loss on ``eval_batches`` batches, its perplexity (or the accuracy)."""
        self.model.eval()
        nll, count, correct = 0.0, 0, 0
        try:
            it = batches(self.val_set, self.config.batch_size, shuffle=False)
            for _, batch in zip(range(self.config.eval_batches), it):
                with autocast_for(self.device, self._autocast):
                    part = batch_nll(self.model, move_batch(batch, self.device))
                nll, count, correct = nll + part.nll, count + part.count, correct + part.correct
        finally:
            self.model.train()
        val = nll / count if count else math.nan
        if self.label_names:
            return EvalEvent(self.step, val, perplexity(val), correct / count if count else None, count)
        return EvalEvent(self.step, val, perplexity(val), None, count)

    @torch.no_grad()
    def generate(self, prompts: Sequence[str], max_new_tokens: int | None = None) -> list[str]:
        """Greedy continuations of ``prompts`` (causal LM tasks); the model is back in train mode after."""
        self.prepare()
        if self.label_names:
            return []
        tok, n = self.tokenizer, max_new_tokens or self.config.sample_tokens
        self.model.eval()
        try:
            encoded = [move_batch(dict(tok(p, return_tensors="pt")), self.device) for p in prompts]
            return [greedy_continuation(self.model, tok, ids, n) for ids in encoded]
        finally:
            self.model.train()

    def _sample(self, stage: str) -> None:
        prompts = self.config.sample_prompts
        if not prompts or self.label_names or not self.ranks.main:
            return
        for prompt, text in zip(prompts, self.generate(prompts)):
            self._emit("on_sample", SampleEvent(stage, prompt, text, self.step))

    def _eval(self) -> EvalEvent:
        event = self.evaluate()
        self._emit("on_eval", event)
        return event

    def save_adapter(self, directory: str | Path | None = None) -> Path:
        """Save the adapter in PEFT's format (default: ``config.output_dir``, else ``adapter_dir``, else a fresh
        folder under the cache's ``adapters/``).

        Raises:
            DivergedError: the adapter holds NaN/inf values (it is not written).
        """
        if not adapter_is_finite(self.model):
            raise DivergedError(f"FineTuner: the adapter holds NaN/inf values at step {self.step}; not saved")
        if directory is None:
            directory = self.config.output_dir or self.adapter_dir or default_adapter_dir(self.config.backend)
        return save_adapter(self.model, directory)

    def _checkpoint(self) -> None:
        if adapter_is_finite(self.model):  # a non-finite state is never sent over the last good one
            if self.ranks.main:  # only rank 0's listeners write checkpoints: other ranks would drop the copy
                self._emit("on_checkpoint", CheckpointEvent(self.step, self.snapshot()))
            self._checkpoint_step = self.step

    def run(self) -> History:
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

    def _begin(self, t0: float) -> tuple[float, float | None]:
        """Prepare, announce the start, restore a checkpoint or evaluate step 0: (time origin, last val loss)."""
        self.prepare()
        counts = trainable_parameters(self.model)
        cfg = self.config
        run_id = self.run_dir.name if self.run_dir is not None else None
        self._emit("on_start", StartEvent(cfg, counts.trainable, counts.total, len(self.train_set),
                                          len(self.val_set), run_id, str(self.device)))  # fmt: skip
        if self._guard is None:
            self._guard = UniformLossGuard(cfg, None if self.label_names else vocab_size(self.model))
        if self._resume_state is not None:
            self._restore(self._resume_state)
            t0 -= self._resume_state.elapsed_s  # elapsed_s continues from the time already spent
            self._resume_state, self._checkpoint_step = None, self.step
            return t0, (self.history.evals[-1].val_loss if self.history.evals else None)
        if self.history.evals and self.history.evals[-1].step == self.step:
            return t0, self.history.evals[-1].val_loss  # a restart after stop(): this step was evaluated
        self._sample("before")
        return t0, self._eval().val_loss

    def _run_loop(self) -> History:
        cfg = self.config
        self.running = True
        self._stop.clear()
        t0 = self._t0 = time.perf_counter()
        val: float | None = None
        self._checkpoint_step: int | None = None
        try:
            t0, val = self._begin(t0)
            self._t0 = t0
            batches_ = self._batches()
            while self.step < cfg.steps and not self._stop_agreed():
                self._train_step(batches_, t0)
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
            end = self._end_event(t0, val, adapter)
        except DivergedError as err:
            kept = f"; the last good checkpoint (step {self._checkpoint_step}) is kept" if (
                self._checkpoint_step is not None) else ""  # fmt: skip
            warnings.warn(f"{err}{kept}", RuntimeWarning, stacklevel=2)
            end = self._end_event(t0, val, None, f"{err}{kept}", diverged=True)
        except BaseException as err:  # KeyboardInterrupt too: listeners learn the run ended (then re-raised)
            self.running = False
            self._emit("on_end", self._end_event(t0, val, None, f"{type(err).__name__}: {err}"))
            raise
        self.running = False
        self._emit("on_end", end)
        return self.history

    def _stop_agreed(self) -> bool:
        """Whether to stop now: asked on any rank stops every rank (no rank is left in a collective alone)."""
        asked = self._stop.is_set()
        if self.ranks.world > 1:
            asked = sum_over_ranks([float(asked)], self.ranks)[0] > 0
            if asked:
                self._stop.set()
        return asked

    def _end_event(self, t0, val, adapter, error=None, diverged=False) -> EndEvent:
        return EndEvent(self.step, self._stop.is_set(), adapter, time.perf_counter() - t0, val, error, diverged,
                        tuple(self.history.warnings))  # fmt: skip

    def _train_step(self, batches_: Iterator[dict[str, torch.Tensor]], t0: float) -> None:
        cfg = self.config
        start = time.perf_counter()
        total, tokens = 0.0, 0
        for k in range(cfg.grad_accum):
            batch = next(batches_)
            if self._saved_bytes is None and k == 0 and not cfg.gradient_checkpointing:
                with SavedTensorRecorder(self.model) as rec:  # once: every step saves the same (fixed shapes)
                    loss = self._loss(batch)
                self._saved_bytes = rec.activation_bytes()
            else:
                loss = self._loss(batch)
            (loss / cfg.grad_accum).backward()
            total += float(loss.detach()) / cfg.grad_accum
            tokens += int(batch["attention_mask"].sum())
        if self.ranks.world > 1:  # the step's loss is the mean over ranks, its tokens the sum
            summed, tokens = sum_over_ranks([total, tokens], self.ranks)
            total, tokens = summed / self.ranks.world, int(tokens)
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
            self._saved_bytes, peak_memory(self.device, peak_rss_bytes()),
        )  # fmt: skip
        self._emit("on_step", event)
        if not self._plans_sent:  # plans exist once the first step ran every layer
            self._plans_sent = True
            plans = self.plans
            rows = json.loads(plans.to_json(orient="records")) if len(plans) else []
            self._emit("on_plans", PlansEvent(self.step, tuple(rows)))
        message = self._guard.check(event) if self._guard is not None else None
        if message:
            self._warn(message)
