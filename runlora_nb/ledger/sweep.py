"""Hyper-parameter sweeps on optuna: every trial is a run in the ledger, the study lives in SQLite, resumable.

:func:`run_sweep` searches a :class:`~runlora_nb.ledger.space.SearchSpace` with optuna's grid, random or TPE
sampler, prunes with optuna's ``MedianPruner`` fed by each evaluation's validation loss (``trial.report`` /
``trial.should_prune`` from the engine's ``on_eval`` event), and stops at a trial budget, a time budget or a
Stop request (a ``threading.Event`` or a callable). Each trial is a :class:`FineTuner` run recorded by the run
ledger; its run id is the trial's ``run_id`` user attr.

Resume: call again with the same study name and storage. Finished trials are kept; a trial left RUNNING by a
dead process (Stop, kernel restart, kill -9) is marked FAIL at resume (this host: its pid is gone; elsewhere:
optuna's heartbeat went stale) and its parameters are queued again, so the budget counts trials that ended on
their own: complete, pruned, failed or diverged. The study stores the search space and the fixed setup as user
attrs; resuming with another one is refused.
"""

from __future__ import annotations

import contextlib
import itertools
import math
import os
import socket
import threading
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import fields, replace
from typing import Any

import pandas as pd
import torch

from ..common.sysmem import reset_peak_rss
from ..train.config import FineTuneConfig
from ..train.events import Callback
from .recorded import recorded_tuner
from .space import SearchSpace
from .sweep_storage import (
    _LIVE,
    _optuna,
    _rdb_storage,
    _recover,
    _requeue,
    _trial_is_dead,
    open_study,
    storage_url,
)

__all__ = ["SAMPLERS", "SearchSpace", "leaderboard", "open_study", "run_sweep", "storage_url"]

SAMPLERS = ("grid", "random", "tpe")
# where a study's runs are kept and which device trains them do not change what it searches: a study resumes
# with another of either
_PORTABLE = ("runs_dir", "device")
_COUNTED = {"complete", "pruned", "failed", "diverged"}  # outcomes that use up the trial budget


# ------------------------------------------------------------------------------------------------- trials


class _TrialReporter(Callback):
    """Feeds each evaluation to optuna's pruner and turns Stop requests into a call of ``stop_run``.

    Args:
        trial: the optuna trial.
        stopping: True when the whole sweep is asked to stop.
        prune: whether the pruner may end the trial.
        stop_run: ends the trial's run after the current step (the tuner's ``stop``).
    """

    def __init__(
        self, trial, stopping: Callable[[], bool], prune: bool, stop_run: Callable[[], None]
    ) -> None:
        self.trial, self.stopping, self.prune, self.stop_run = trial, stopping, prune, stop_run
        self.pruned = self.stopped = False
        self.trainable = None
        self.steps = 0

    def on_start(self, event) -> None:
        self.trainable = event.trainable_params
        self.steps = event.config.steps

    def on_step(self, event) -> None:
        if self.stopping():
            self.stopped = True
            self.stop_run()

    def on_eval(self, event) -> None:
        if event.step == 0 or not math.isfinite(event.val_loss) or event.step >= self.steps:
            return  # the untrained model says nothing about the trial; the last eval is the result
        self.trial.report(event.val_loss, event.step)
        if self.prune and self.trial.should_prune():
            self.pruned = True
            self.stop_run()


class _Stopped(Exception):
    """The sweep was asked to stop mid-trial (the trial is queued again)."""


def _same_point(a: dict[str, Any], b: dict[str, Any]) -> bool:
    return a.keys() == b.keys() and all(a[k] == b[k] or (a[k] != a[k] and b[k] != b[k]) for k in a)


def _taken_by(trial) -> Any:
    """Another trial that has run, or is running, this trial's grid point; None if there is none.

    Two workers on one grid study can be handed the same point: optuna's GridSampler gives a running point
    again once every point has started. A point counts as taken by a trial that completed or was pruned on
    it, or by a live trial with a lower number (the lower number wins, so of two trials that pick one point
    at the same moment exactly one trains: each stores its parameters before it looks).
    """
    optuna = _optuna()
    state = optuna.trial.TrialState
    for t in trial.study.get_trials(deepcopy=False, states=(state.COMPLETE, state.PRUNED, state.RUNNING)):
        if t.number == trial.number or not _same_point(t.params, trial.params):
            continue
        if t.state == state.RUNNING and (t.number > trial.number or _trial_is_dead(t)):
            continue
        if t.user_attrs.get("outcome") == "duplicate":
            continue
        return t
    return None


def _grid_left(study, grid: dict[str, list]) -> bool:
    """Whether a point of ``grid`` has no trial that completed, was pruned or is running (alive) on it."""
    optuna = _optuna()
    state = optuna.trial.TrialState
    taken = [
        t.params
        for t in study.get_trials(deepcopy=False, states=(state.COMPLETE, state.PRUNED, state.RUNNING))
        if t.user_attrs.get("outcome") != "duplicate" and not (t.state == state.RUNNING and _trial_is_dead(t))
    ]
    names = sorted(grid)
    for values in itertools.product(*(grid[n] for n in names)):
        point = dict(zip(names, values))
        if not any(_same_point(point, p) for p in taken):
            return True
    return False


def _objective(space, base, callbacks, stopping, prune, grid=None):
    optuna = _optuna()

    def objective(trial) -> float:
        _LIVE.add(trial._trial_id)
        trial.set_user_attr("pid", os.getpid())
        trial.set_user_attr("host", socket.gethostname())
        try:
            _reset_peak_memory()  # each trial's own peak, not the high-water mark of the trials before it
            cfg = replace(base, **space.suggest(trial))
            if grid is not None and (other := _taken_by(trial)) is not None:
                # another worker has this grid point: training it again would only duplicate its run
                trial.set_user_attr("outcome", "duplicate")
                trial.set_user_attr("duplicate_of", other.number)
                trial.set_user_attr("grid_left", _grid_left(trial.study, grid))
                raise optuna.TrialPruned(f"grid point already taken by trial {other.number}")
            tuner = recorded_tuner(cfg, callbacks)
            reporter = _TrialReporter(trial, stopping, prune, tuner.stop)
            tuner.add_callback(reporter)
            trial.set_user_attr("run_id", tuner.run_dir.name)
            try:
                result = tuner.run()
            except Exception as err:
                trial.set_user_attr("outcome", "failed")
                trial.set_user_attr("error", f"{type(err).__name__}: {err}"[:500])
                raise
            steps = result.steps
            peak = max((s.peak_mem_bytes or 0 for s in steps), default=0)
            for key, value in (
                ("trainable_params", reporter.trainable),
                ("tokens_per_s", result.tokens_per_s if steps else None),
                ("peak_mem_bytes", peak or None),
                ("time_s", result.end.elapsed_s),
                ("step", result.end.step),
            ):
                trial.set_user_attr(key, value)
            if reporter.stopped and not reporter.pruned:
                trial.set_user_attr("outcome", "stopped")
                _requeue(trial.study, trial)
                raise _Stopped
            if result.end.diverged:
                trial.set_user_attr("outcome", "diverged")
                trial.set_user_attr("error", result.end.error[:500])
                raise RuntimeError(result.end.error)
            last = result.evals[-1]
            trial.set_user_attr("val_loss", last.val_loss)
            trial.set_user_attr("perplexity", last.perplexity)
            if reporter.pruned:
                trial.set_user_attr("outcome", "pruned")
                raise optuna.TrialPruned(f"pruned at step {result.end.step}")
            if not math.isfinite(last.val_loss):
                trial.set_user_attr("outcome", "failed")
                raise RuntimeError(f"validation loss is {last.val_loss}")
            trial.set_user_attr("outcome", "complete")
            return float(last.val_loss)
        except BaseException as err:
            if not isinstance(err, Exception):  # Ctrl-C: like a kill, the trial is run again on resume
                with contextlib.suppress(Exception):
                    trial.set_user_attr("outcome", "interrupted")
                    _requeue(trial.study, trial)
            raise
        finally:
            _LIVE.discard(trial._trial_id)

    return objective


def _reset_peak_memory() -> None:
    reset_peak_rss()
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.reset_peak_memory_stats()


# ------------------------------------------------------------------------------------------------- sweep


def _make_sampler(sampler: str, space: SearchSpace, seed: int):
    optuna = _optuna()
    if sampler not in SAMPLERS:
        raise ValueError(f"sweep: sampler must be one of {list(SAMPLERS)}, got {sampler!r}")
    if sampler == "grid":
        return optuna.samplers.GridSampler(space.grid() or {"_": [0]}, seed=seed)
    if sampler == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    return optuna.samplers.TPESampler(seed=seed, n_startup_trials=min(10, max(2, len(space.varying()) + 1)))


def _make_pruner(pruner: Any):
    optuna = _optuna()
    if pruner == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=0)
    if pruner is None or pruner == "none":
        return optuna.pruners.NopPruner()
    if isinstance(pruner, optuna.pruners.BasePruner):
        return pruner
    raise ValueError(f"sweep: pruner must be 'median', None or an optuna pruner, got {pruner!r}")


def _outcome(t) -> str:
    state = t.state.name.lower()
    if state == "fail":
        return t.user_attrs.get("outcome") or "interrupted"
    if state == "running" and _trial_is_dead(t):
        return "interrupted"
    return t.user_attrs.get("outcome", state) if state != "running" else "running"


def _counted(study) -> int:
    return sum(1 for t in study.get_trials(deepcopy=False) if _outcome(t) in _COUNTED)


def _base_config(model: str, dataset: str, steps: int, config: dict[str, Any] | None) -> FineTuneConfig:
    config = dict(config or {})
    known = {f.name for f in fields(FineTuneConfig)}
    searched = {f.name for f in fields(SearchSpace)} | {"model", "dataset", "steps"}
    bad = sorted(set(config) - known)
    if bad:
        raise ValueError(f"run_sweep: unknown config field(s) {bad}; FineTuneConfig has {sorted(known)}")
    clash = sorted(set(config) & searched)
    if clash:
        raise ValueError(
            f"run_sweep: {clash} belong in the SearchSpace (or the model/dataset/steps arguments), not config"
        )
    defaults = {"sample_prompts": (), "checkpoint_every": 0, "eval_interval": max(1, steps // 4)}
    return FineTuneConfig(model=model, dataset=dataset, steps=steps, **{**defaults, **config})


def run_sweep(
    model: str,
    dataset: str,
    space: SearchSpace | dict[str, Any],
    steps: int,
    trials: int,
    study_name: str,
    storage: str | os.PathLike | None = None,
    *,
    sampler: str | None = None,
    pruner: Any = "median",
    timeout: float | None = None,
    stop: threading.Event | Callable[[], bool] | None = None,
    config: dict[str, Any] | None = None,
    callbacks: Sequence[Any] = (),
    seed: int = 0,
    verbose: bool = False,
) -> pd.DataFrame:
    """Run (or resume) a sweep: up to ``trials`` fine-tuning runs chosen by optuna, each a ledger run.

    Args:
        model: zoo name or local folder.
        dataset: dataset name or file.
        space: a :class:`SearchSpace` (or a dict of its fields).
        steps: optimizer steps per trial.
        trials: the trial budget: trials that end on their own (complete, pruned, failed, diverged); a grid
            sweep runs at most the grid's size.
        study_name: the optuna study (resuming: the same name and storage).
        storage: SQLite file or URL (default ``<cache>/sweeps/sweeps.db``).
        sampler: ``"grid"``, ``"random"`` or ``"tpe"``; None: grid when every varied field is a list, else TPE.
        pruner: ``"median"`` (optuna's MedianPruner after 2 trials), None, or an optuna pruner.
        timeout: time budget in seconds for this call: no trial starts after it (a running one finishes).
        stop: a ``threading.Event`` or a callable returning True to stop: the running trial stops after its
            current step and is queued again for the next resume.
        config: other FineTuneConfig fields for every trial (seq_len, batch_size, runs_dir, ...; default no
            samples, no periodic checkpoints, 4 evaluations per trial).
        callbacks: engine callbacks added to every trial's FineTuner (a panel's live view).
        seed: sampler seed.
        verbose: print one line per trial.

    Returns:
        The :func:`leaderboard` of the study.

    Raises:
        ValueError: an invalid space, config, sampler, pruner, budget, an unwritable storage, or a study made
            with another space or setup.
    """
    optuna = _optuna()
    space = space if isinstance(space, SearchSpace) else SearchSpace.from_dict(dict(space))
    for name, value, low in (("trials", trials, 1), ("steps", steps, 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"run_sweep: {name} must be an int >= {low}, got {value!r}")
    if timeout is not None and not timeout > 0:
        raise ValueError(f"run_sweep: timeout must be > 0 seconds or None, got {timeout!r}")
    if sampler is None:
        sampler = "tpe" if any(d[0] == "range" for d in space.varying().values()) else "grid"
    base = _base_config(model, dataset, steps, config)
    budget = min(trials, space.grid_size()) if sampler == "grid" else trials
    setup = {"model": model, "dataset": dataset, "steps": steps, "sampler": sampler,
             "config": {k: v for k, v in sorted((config or {}).items()) if k not in _PORTABLE}}  # fmt: skip
    if isinstance(stop, threading.Event):
        stopping = stop.is_set
    elif stop is None:
        stopping = lambda: False  # noqa: E731
    else:
        stopping = stop
    grid = space.grid() if sampler == "grid" else None  # {} when nothing varies: one point, no params
    objective = _objective(space, base, list(callbacks), stopping, pruner not in (None, "none"), grid)
    idle = False  # every grid point is done or being run by another worker: nothing left for this one

    def after(study_, trial) -> None:
        nonlocal idle
        if verbose:
            row = leaderboard_row(trial)
            print(
                f"trial {trial.number}: {row['status']} val_loss={row['val_loss']} {trial.params}", flush=True
            )
        if trial.user_attrs.get("outcome") == "duplicate" and not trial.user_attrs.get("grid_left"):
            idle = True
        if idle or stopping() or _counted(study_) >= budget:
            study_.stop()

    t0 = time.monotonic()
    level = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.ERROR)  # failed trials are in the leaderboard (error column)
    try:
        study = open_study(
            study_name, storage, space, setup, _make_sampler(sampler, space, seed), _make_pruner(pruner)
        )
        _recover(study)
        while not stopping() and not idle:
            remaining = budget - _counted(study)
            left = None if timeout is None else timeout - (time.monotonic() - t0)
            if remaining <= 0 or (left is not None and left <= 0):
                break
            before = len(study.trials)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                study.optimize(
                    objective, n_trials=remaining, timeout=left, callbacks=[after], catch=(Exception,)
                )
            if len(study.trials) == before:  # nothing ran (cannot happen with a positive budget)
                break
    finally:
        optuna.logging.set_verbosity(level)
    return leaderboard(study)


# ------------------------------------------------------------------------------------------------- results


def leaderboard_row(t) -> dict[str, Any]:
    """One trial as a leaderboard row (see :func:`leaderboard`)."""
    a = t.user_attrs
    val = a.get("val_loss")
    return {
        "trial": t.number,
        **{k: v for k, v in t.params.items()},
        "val_loss": val,
        "perplexity": a.get("perplexity"),
        "tokens_per_s": a.get("tokens_per_s"),
        "peak_mem_bytes": a.get("peak_mem_bytes"),
        "trainable_params": a.get("trainable_params"),
        "time_s": a.get("time_s"),
        "status": _outcome(t),
        "run_id": a.get("run_id"),
        "error": a.get("error"),
    }


def leaderboard(study_or_name: Any, storage: str | os.PathLike | None = None) -> pd.DataFrame:
    """A study's trials, best first.

    Args:
        study_or_name: an ``optuna.Study`` or a study name in ``storage``.
        storage: see :func:`storage_url` (with a name).

    Returns:
        One row per trial (queued ones left out): trial, one column per searched parameter, val_loss (the last
        evaluation), perplexity, tokens_per_s (median), peak_mem_bytes (CUDA's peak in the trial, else the
        trial's own peak RSS on Linux, the process's peak so far elsewhere), trainable_params, time_s, status (complete / pruned /
        failed / diverged / stopped / interrupted / running / duplicate: a grid point another worker had
        taken, not trained), run_id (the ledger run), error; sorted by
        validation loss, complete trials first.

    Raises:
        ValueError: no such study.
    """
    optuna = _optuna()
    study = study_or_name
    if isinstance(study_or_name, str):
        try:
            study = optuna.load_study(study_name=study_or_name, storage=_rdb_storage(storage_url(storage)))
        except KeyError:
            raise ValueError(f"sweep: no study {study_or_name!r} in {storage_url(storage)}") from None
    rows = [leaderboard_row(t) for t in study.get_trials(deepcopy=False) if t.state.name != "WAITING"]
    columns = ["trial", *sorted({k for t in study.trials for k in t.params}), "val_loss", "perplexity",
               "tokens_per_s", "peak_mem_bytes", "trainable_params", "time_s", "status", "run_id", "error"]  # fmt: skip
    df = pd.DataFrame(rows, columns=columns)
    if len(df):
        df["_order"] = (df.status != "complete").astype(int)
        df = df.sort_values(["_order", "val_loss", "trial"], na_position="last").drop(columns="_order")
    df = df.reset_index(drop=True)
    df.attrs["study"] = study.study_name
    return df
