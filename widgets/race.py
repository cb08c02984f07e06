"""Chain race state: race every valid chain pair, the planner's choice, PEFT and the frozen floor.

:class:`RaceController` runs :func:`runlora_nb.measure.race_layer` (one layer shape) or
:func:`runlora_nb.measure.race_model` (the picked model) in a background thread, keeps each candidate's latest
:class:`~runlora_nb.measure.Measurement` as it lands, and can be cancelled. No widget is imported here.
"""

from __future__ import annotations

import math
import threading
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import pandas as pd

from runlora_nb.core.chains import valid_pairs
from runlora_nb.measure import DTYPES, LayerSpec, Measurement, race_layer, race_model
from runlora_nb.measure.layer_race import twin_names

from .tasks import BackgroundTask, Listeners

__all__ = ["SOURCES", "RaceController", "RaceSettings", "devices"]

SOURCES: tuple[str, ...] = ("layer", "model")
MODEL_CANDIDATES: tuple[str, ...] = ("no adapters", "peft", "runlora")


@dataclass(frozen=True)
class RaceSettings:
    """What to race.

    Attributes:
        source: ``"layer"`` (one layer of the shape below) or ``"model"`` (the picker's model, batch and
            sequence length, rank, dropout, dtype and targets).
        tokens: N.
        in_features: i.
        out_features: o.
        rank: r.
        dtype: ``"fp32"``, ``"bf16"`` or ``"fp16"``.
        dropout: adapter dropout (> 0 rules out the merged chains).
        reps: timed rounds.
        warmup: untimed rounds first.
        device: ``"cpu"`` or ``"cuda"`` (layer races; default CUDA when available; on CUDA the memory chart
            adds the allocator's peak).
        noise_check: layer races only: race the planner's layer against three copies of itself (every
            candidate the same layer), so the spread of the bars is the machine's noise, nothing else.
        shuffle_seed: seed of the candidate order, shuffled every round.
    """

    source: str = "layer"
    tokens: int = 1024
    in_features: int = 576
    out_features: int = 1536
    rank: int = 8
    dtype: str = "fp32"
    dropout: float = 0.0
    reps: int = 5
    warmup: int = 1
    device: str = field(default_factory=lambda: devices()[-1])  # CUDA when there is one
    noise_check: bool = False
    shuffle_seed: int = 0

    def spec(self) -> LayerSpec:
        return LayerSpec(
            self.tokens,
            self.in_features,
            self.out_features,
            self.rank,
            dtype=self.dtype,
            dropout=self.dropout,
            device=self.device,
        )


def devices() -> list[str]:
    """Devices a layer race can run on here."""
    import torch

    return ["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"]


class RaceController:
    """Run a chain race in the background and keep its live results.

    Args:
        picker: the shared :class:`~runlora_nb.widgets.picker.PickerController` (needed for ``source="model"``).
        **settings: :class:`RaceSettings` fields.

    Events (``subscribe(fn)``, ``fn(kind, payload)``): ``"started"`` (candidate names), ``"measurement"`` (a
    :class:`~runlora_nb.measure.Measurement`), ``"round"`` (the round index, once all of that round's
    measurements were delivered), ``"done"`` (the result DataFrame), ``"error"`` (traceback text).

    Honest timing: measurements and ``"round"`` events are delivered between rounds, in the race thread, and
    the next round starts only when every ``"round"`` subscriber returned. A view draws its chart in its
    ``"round"`` handler (and may wait there for its front end), never from a timer that could fire while a
    candidate is being timed.
    """

    def __init__(self, picker: Any = None, **settings: Any) -> None:
        self.picker = picker
        self.settings = RaceSettings(**settings)
        self.listeners = Listeners()
        self.task = BackgroundTask("runlora-race", on_error=self._failed)
        self._cancel = threading.Event()
        self._lock = threading.Lock()
        self._active = False
        self._reset()

    def _reset(self) -> None:
        with self._lock:
            self.candidates: list[str] = []
            self.measurements: dict[str, Measurement] = {}
            self.received = 0
            self.result: pd.DataFrame | None = None
            self.plans: pd.DataFrame | None = None
            self.cancelled = False
            self.error: str | None = None
            self.ran: RaceSettings | None = None

    def subscribe(self, fn) -> Any:
        return self.listeners.subscribe(fn)

    def set(self, **changes: Any) -> RaceSettings:
        """Change settings (validated).

        Raises:
            ValueError: unknown field, unknown source, a dtype other than fp32 / bf16 / fp16, or a bad shape.
        """
        new = replace(self.settings, **changes)
        if new.source not in SOURCES:
            raise ValueError(f"source must be one of {SOURCES}, got {new.source!r}")
        if new.device not in devices():
            raise ValueError(f"device must be one of {devices()} here, got {new.device!r}")
        if new.noise_check and new.source == "model":
            raise ValueError("noise_check races one layer against copies of itself; use source='layer'")
        if new.reps < 1 or new.warmup < 0:
            raise ValueError(f"reps must be ≥ 1 and warmup ≥ 0, got reps={new.reps}, warmup={new.warmup}")
        allowed = (*DTYPES, *DTYPES.values())
        if new.dtype not in allowed:  # torch knows "int8" too, but a race cannot run in it
            raise ValueError(
                f"RaceController.set: dtype must be one of {allowed}, got {new.dtype!r}; quantized bases are "
                "raced with LayerSpec(quant='nf4' / 'int8') through runlora_nb.measure.race_layer"
            )
        new.spec()  # validates sizes
        self.settings = new
        return new

    # ----------------------------------------------------------------------------------------- what races
    def expected_candidates(self, settings: RaceSettings | None = None) -> list[str]:
        """Candidate names in the engine's order (frozen, peft, runlora, its twin, then every valid pair)."""
        s = settings or self.settings
        if s.source == "model":
            return list(MODEL_CANDIDATES)
        if s.noise_check:
            return ["runlora", *twin_names(3)]
        return ["frozen", "peft", "runlora", *twin_names(1), *("+".join(p) for p in valid_pairs(s.dropout))]

    @property
    def total(self) -> int:
        """Measurements a full race delivers (candidates × reps)."""
        s = self.ran or self.settings
        return len(self.candidates or self.expected_candidates(s)) * s.reps

    @property
    def running(self) -> bool:
        """A race was started and has not ended (cleared before the ``"done"`` / ``"error"`` event)."""
        return self._active

    # ----------------------------------------------------------------------------------------- running
    def start(self) -> threading.Thread:
        """Race in a background thread (the kernel keeps handling widget messages, so Cancel works)."""
        if self.running:
            raise RuntimeError("a race is already running; cancel it first")
        self.task.join(5.0)  # the previous worker may still be returning after its "done" event
        self._begin()
        return self.task.start(self._race)

    def run(self) -> pd.DataFrame:
        """Race in the calling thread; returns the result table."""
        if self.running:
            raise RuntimeError("a race is already running; cancel it first")
        self._begin()
        try:
            return self._race()
        except Exception as exc:
            import traceback

            self._failed("".join(traceback.format_exception(type(exc), exc, exc.__traceback__)))
            raise

    def cancel(self) -> None:
        """Stop the race between two calls; the rounds done so far become the result."""
        self._cancel.set()

    def join(self, timeout: float | None = None) -> bool:
        return self.task.join(timeout)

    def _begin(self) -> None:
        self._reset()
        self._cancel.clear()
        s = self.settings
        self._active = True
        with self._lock:
            self.ran = s
            self.candidates = self.expected_candidates(s)
        self.listeners.notify("started", list(self.candidates))

    def _race(self) -> pd.DataFrame:
        from .tasks import quiet_imports

        quiet_imports()
        s = self.ran or self.settings
        if s.source == "model":
            if self.picker is None:
                raise RuntimeError("source='model' races the picker's model, but this race has no picker")
            loaded = self.picker.ensure_loaded()
            c = self.picker.choice
            out = race_model(
                loaded.model,
                batch=c.batch_size,
                seq=c.seq_len,
                r=c.r,
                alpha=c.alpha,
                dropout=c.dropout,
                dtype=c.dtype,
                target_modules=c.target_modules,
                reps=s.reps,
                warmup=s.warmup,
                on_measurement=self._measured,
                on_round=self._round,
                cancel=self._cancel.is_set,
                shuffle_seed=s.shuffle_seed,
            )
            df, plans = out.times.copy(), out.plans
            df["model"] = c.model  # race_model names a given module by its class
        else:
            df = race_layer(
                s.spec(),
                reps=s.reps,
                warmup=s.warmup,
                noise_check=s.noise_check,
                on_measurement=self._measured,
                on_round=self._round,
                cancel=self._cancel.is_set,
                shuffle_seed=s.shuffle_seed,
            )
            plans = None
        with self._lock:
            self.result = df
            self.plans = plans
            self.cancelled = bool(df.attrs.get("cancelled"))
        self._active = False
        self.listeners.notify("done", df)
        return df

    def _measured(self, m: Measurement) -> None:
        with self._lock:
            if m.candidate not in self.candidates:
                self.candidates.append(m.candidate)
            self.measurements[m.candidate] = m
            self.received += 1
        self.listeners.notify("measurement", m)

    def _round(self, k: int) -> None:
        self.listeners.notify("round", k)  # subscribers draw here; the next round waits for them

    def _failed(self, text: str) -> None:
        with self._lock:
            self.error = text
        self._active = False
        self.listeners.notify("error", text)

    # ----------------------------------------------------------------------------------------- views
    def snapshot(self) -> list[Measurement]:
        """The latest measurement of every candidate that has one, in candidate order."""
        with self._lock:
            return [self.measurements[c] for c in self.candidates if c in self.measurements]

    def live_table(self) -> pd.DataFrame:
        """The result table once the race ended, else a table of the measurements so far."""
        if self.result is not None:
            return self.result
        rows = [
            {
                "candidate": m.candidate,
                "kind": m.kind,
                "median_s": m.median,
                "iqr_s": m.iqr,
                "saved_bytes": m.saved_bytes,
                "peak_bytes": m.peak_bytes,
                "flops": m.flops,
                "predicted_s": m.predicted_s,
                "reps": len(m.samples),
            }
            for m in self.snapshot()
        ]
        return pd.DataFrame(rows)

    def predicted_vs_measured(self) -> pd.DataFrame:
        """Candidates with a cost-model prediction: candidate, kind, predicted_s, median_s."""
        rows = [
            {"candidate": m.candidate, "kind": m.kind, "predicted_s": m.predicted_s, "median_s": m.median}
            for m in self.snapshot()
            if m.predicted_s is not None and not math.isnan(m.median)
        ]
        return pd.DataFrame(rows, columns=["candidate", "kind", "predicted_s", "median_s"])

    def export_csv(self, path: str | Path) -> Path:
        """Write the result table (or the measurements so far) as CSV; returns the path.

        Raises:
            RuntimeError: nothing measured yet.
        """
        df = self.live_table()
        if df.empty:
            raise RuntimeError("nothing to export yet: run a race first")
        path = Path(path).expanduser()
        path.parent.mkdir(parents=True, exist_ok=True)
        df.to_csv(path, index=False)
        return path

    def describe(self) -> str:
        """One line: what raced (or will race)."""
        s = self.ran or self.settings
        if s.source == "model":
            c = self.picker.choice if self.picker is not None else None
            what = f"model {c.model}, batch {c.batch_size} × seq {c.seq_len}, r={c.r}" if c else "model"
        else:
            what = s.spec().label()
            if s.noise_check:
                what += f"; noise check: runlora against {len(twin_names(3))} copies of itself"
        return f"{what}; {s.reps} rounds after {s.warmup} warm-up"

    def settings_dict(self) -> dict[str, Any]:
        return asdict(self.settings)
