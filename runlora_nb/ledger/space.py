"""The search space of a sweep: each LoRA/run setting is a fixed value, a list of choices or a range.

:class:`SearchSpace` is a frozen dataclass with one field per setting a sweep may vary: ``r``, ``alpha`` (or
``alpha_over_r``), ``lr``, ``dropout``, ``targets``, ``quantization``, ``dtype``, ``backend``, ``chain``,
``use_rslora`` (rsLoRA's alpha / sqrt(r) scaling) and ``lora_plus_ratio`` (LoRA+: a larger lr for B). Each
field is

- a fixed value (``lr=3e-4``, ``targets="all-linear"``, ``targets=("q_proj", "v_proj")``),
- a list of choices (``r=[4, 8, 16]``, ``targets=["all-linear", ["q_proj", "v_proj"]]``), or
- for the numeric fields, a range tuple ``(low, high)`` or ``(low, high, log)`` (``lr=(1e-4, 1e-2, True)``).

Invalid input raises one ValueError naming the field, the bad value and the fix. :meth:`SearchSpace.suggest`
draws a trial's values through optuna's ``trial.suggest_*``; :meth:`SearchSpace.describe` is the canonical
JSON-able form a study stores (to refuse resuming a study with another space). :func:`parse_values` reads the
CLI's ``4,8,16`` / ``1e-4:1e-2:log`` syntax.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, fields
from typing import Any

__all__ = ["SearchSpace", "parse_values"]

_INT = ("r",)
_FLOAT = ("alpha", "alpha_over_r", "lr", "dropout", "lora_plus_ratio")
_CATEGORICAL = {
    "targets": None,  # any name list / "all-linear" / None
    "quantization": (None, "nf4", "fp4", "int8"),
    "dtype": ("fp32", "bf16", "fp16"),
    "backend": ("runlora", "peft"),
    "chain": ("auto", "flops", "timed"),
    "use_rslora": (False, True),
}


def _check_number(name: str, value: Any) -> str | None:
    """Why ``value`` is not allowed for numeric field ``name`` (None: fine)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return f"a number, got {value!r}"
    if name == "r" and (not float(value).is_integer() or value < 1):
        return f"an integer >= 1, got {value!r}"
    if name == "dropout" and not 0 <= value < 1:
        return f"in [0, 1), got {value!r}"
    if name in ("alpha", "alpha_over_r", "lr", "lora_plus_ratio") and not value > 0:
        return f"> 0, got {value!r}"
    return None


def _check_category(name: str, value: Any) -> str | None:
    allowed = _CATEGORICAL[name]
    if allowed is None:  # targets
        if value is None or isinstance(value, str):
            return None if value != "" else "a module name list, 'all-linear' or None, got ''"
        if isinstance(value, list | tuple) and value and all(isinstance(v, str) and v for v in value):
            return None
        return f"'all-linear', a list of module names or None, got {value!r}"
    return None if value in allowed else f"one of {list(allowed)}, got {value!r}"


def _encode(name: str, value: Any) -> Any:
    """The optuna-storable form of a choice (module-name lists become comma-joined strings)."""
    if name == "targets" and isinstance(value, list | tuple):
        return ",".join(value)
    if name == "r":
        return int(value)
    return value


@dataclass(frozen=True)
class SearchSpace:
    """What a sweep varies; every other run setting comes from the sweep's base config.

    Attributes:
        r: LoRA rank: fixed int, list of ints, or an int range ``(low, high[, log])``.
        alpha: LoRA alpha (fixed, choices or range); None: ``alpha_over_r * r``.
        alpha_over_r: alpha as a multiple of r (used when ``alpha`` is None; default 2).
        lr: peak learning rate (a log range suits it: ``(1e-4, 1e-2, True)``).
        dropout: adapter dropout in [0, 1).
        targets: ``"all-linear"``, a tuple of module names, None (PEFT's default), or a list of those.
        quantization: None, ``"nf4"``, ``"fp4"``, ``"int8"``, or a list of those.
        dtype: ``"fp32"``, ``"bf16"``, ``"fp16"``, or a list.
        backend: ``"runlora"``, ``"peft"``, or a list.
        chain: planner mode ``"auto"``, ``"flops"``, ``"timed"``, or a list.
        use_rslora: rank-stabilised scaling alpha / sqrt(r) (rsLoRA), False, True, or ``[False, True]``.
        lora_plus_ratio: LoRA+: B's learning rate is ``lr × ratio`` (its paper suggests 16); None: one lr.

    Raises:
        ValueError: an empty list, an empty or inverted range, a range on a categorical field, a log range
            that reaches 0, a value out of its field's domain, or both ``alpha`` and ``alpha_over_r`` varied.

    Example:
        >>> space = SearchSpace(r=[4, 8], lr=(1e-4, 1e-2, True))
        >>> sorted(space.varying())
        ['lr', 'r']
    """

    r: Any = 8
    alpha: Any = None
    alpha_over_r: Any = 2.0
    lr: Any = 3e-4
    dropout: Any = 0.05
    targets: Any = "all-linear"
    quantization: Any = None
    dtype: Any = "fp32"
    backend: Any = "runlora"
    chain: Any = "auto"
    use_rslora: Any = False
    lora_plus_ratio: Any = None

    def __post_init__(self) -> None:
        dims = self.dims()  # validates every field
        if self.alpha is not None and dims["alpha_over_r"][0] != "fixed":
            raise ValueError(
                f"SearchSpace: give alpha or alpha_over_r, not both (alpha={self.alpha!r}, "
                f"alpha_over_r={self.alpha_over_r!r}); set alpha=None to search alpha_over_r"
            )

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> SearchSpace:
        """A space from a mapping of field names to specs.

        Raises:
            ValueError: an unknown field name (the message lists the known ones), or an invalid spec.
        """
        known = [f.name for f in fields(cls)]
        unknown = sorted(set(values) - set(known))
        if unknown:
            raise ValueError(f"SearchSpace: unknown parameter(s) {unknown}; known: {known}")
        return cls(**values)

    # ------------------------------------------------------------------------------------------ structure
    def _dim(self, name: str) -> tuple:
        value = getattr(self, name)
        numeric = name in _INT or name in _FLOAT
        check = _check_number if numeric else _check_category
        if name in ("alpha", "lora_plus_ratio") and value is None:
            return ("fixed", None)
        if isinstance(value, list):
            if not value:
                raise ValueError(f"SearchSpace: {name} is an empty list of choices; give at least one value")
            for v in value:
                if (why := check(name, tuple(v) if isinstance(v, list) else v)) is not None:
                    raise ValueError(f"SearchSpace: each choice of {name} must be {why}")
            encoded = [_encode(name, v) for v in value]
            if len(set(map(json.dumps, encoded))) < len(encoded):
                raise ValueError(f"SearchSpace: {name} lists a choice twice: {value!r}")
            return ("choice", encoded)
        if isinstance(value, tuple) and numeric:
            return ("range", *self._range(name, value, check))
        if (why := check(name, value)) is not None:
            raise ValueError(f"SearchSpace: {name} must be {why} (or a list of choices)")
        return ("fixed", _encode(name, value) if name != "targets" else value)

    @staticmethod
    def _range(name: str, value: tuple, check) -> tuple:
        if len(value) not in (2, 3) or (len(value) == 3 and not isinstance(value[2], bool)):
            raise ValueError(
                f"SearchSpace: a range of {name} is (low, high) or (low, high, log: bool), got {value!r}"
            )
        low, high, log = value[0], value[1], value[2] if len(value) == 3 else False
        for bound in (low, high):
            if (why := check(name, bound)) is not None:
                raise ValueError(f"SearchSpace: the bounds of {name}'s range must be {why}")
        if not low < high:
            what = "empty" if low == high else "inverted"
            raise ValueError(
                f"SearchSpace: the range of {name} is {what}: {value!r}; give low < high "
                f"(or a fixed value {low!r})"
            )
        if log and low <= 0:
            raise ValueError(f"SearchSpace: a log range of {name} needs low > 0, got {value!r}")
        if name in _INT:
            return int(low), int(high), log
        return float(low), float(high), log

    def dims(self) -> dict[str, tuple]:
        """Every field as ``("fixed", v)``, ``("choice", [v, ...])`` or ``("range", low, high, log)``.

        Raises:
            ValueError: an invalid field (see the class).
        """
        for name in ("r", *_FLOAT, *_CATEGORICAL):
            if name not in _INT + _FLOAT and isinstance(getattr(self, name), tuple) and name != "targets":
                raise ValueError(
                    f"SearchSpace: {name} is categorical; a range {getattr(self, name)!r} makes no sense, "
                    f"give a list of choices"
                )
        return {f.name: self._dim(f.name) for f in fields(self)}

    def varying(self) -> dict[str, tuple]:
        """The fields a sweep searches (choices and ranges), as in :meth:`dims`."""
        return {k: d for k, d in self.dims().items() if d[0] != "fixed"}

    def describe(self) -> dict[str, Any]:
        """Canonical JSON-able form (stored with a study; two spaces are the same sweep iff equal)."""
        out: dict[str, Any] = {}
        for name, dim in self.dims().items():
            if dim[0] == "fixed":
                v = dim[1]
                out[name] = {"fixed": list(v) if isinstance(v, tuple) else v}
            elif dim[0] == "choice":
                out[name] = {"choices": dim[1]}
            else:
                out[name] = {"range": list(dim[1:])}
        return json.loads(json.dumps(out))

    def grid(self) -> dict[str, list]:
        """The grid of a grid search: each varying field's choices.

        Raises:
            ValueError: a field is a range (a grid needs finite choices).
        """
        out = {}
        for name, dim in self.varying().items():
            if dim[0] == "range":
                raise ValueError(
                    f"SearchSpace: the grid sampler needs a list of choices for {name}, got the range "
                    f"{getattr(self, name)!r}; list values (e.g. {name}=[{dim[1]}, {dim[2]}]) or use "
                    f"sampler='tpe'/'random'"
                )
            out[name] = list(dim[1])
        return out

    def grid_size(self) -> int:
        size = 1
        for choices in self.grid().values():
            size *= len(choices)
        return size

    # ------------------------------------------------------------------------------------------ sampling
    def suggest(self, trial: Any) -> dict[str, Any]:
        """Draw a trial's values (optuna's ``trial.suggest_*``) and return FineTuneConfig fields.

        Returns:
            ``r``, ``alpha``, ``lr``, ``dropout``, ``targets``, ``quantization``, ``dtype``, ``backend``,
            ``chain``, ``use_rslora`` and ``lora_plus_ratio`` for the run.
        """
        values: dict[str, Any] = {}
        for name, dim in self.dims().items():
            if dim[0] == "fixed":
                values[name] = dim[1]
            elif dim[0] == "choice":
                picked = trial.suggest_categorical(name, dim[1])
                values[name] = self._decode(name, picked)
            elif name in _INT:
                values[name] = trial.suggest_int(name, dim[1], dim[2], log=dim[3])
            else:
                values[name] = trial.suggest_float(name, dim[1], dim[2], log=dim[3])
        over = values.pop("alpha_over_r")
        if values["alpha"] is None:
            values["alpha"] = float(over) * values["r"]
        return values

    def _decode(self, name: str, picked: Any) -> Any:
        if name != "targets":
            return picked
        for choice in getattr(self, name):
            if _encode(name, choice) == picked:
                return tuple(choice) if isinstance(choice, list | tuple) else choice
        return picked


def parse_values(text: str, kind: type = float) -> Any:
    """A CLI value: ``"8"`` (fixed), ``"4,8,16"`` (choices) or ``"1e-4:1e-2[:log]"`` (a range).

    Args:
        text: the option's text.
        kind: ``int``, ``float``, ``bool`` (``true``/``false``) or ``str`` (``"none"`` becomes None for str).

    Returns:
        A fixed value, a list of choices or a ``(low, high, log)`` tuple, as :class:`SearchSpace` takes.

    Raises:
        ValueError: a value that does not parse as ``kind``.
    """

    def one(s: str) -> Any:
        s = s.strip()
        if kind is str:
            return None if s.lower() == "none" else s
        if kind is bool:
            if s.lower() not in ("true", "false"):
                raise ValueError(f"sweep: {s!r} in {text!r} is not true or false")
            return s.lower() == "true"
        try:
            return kind(float(s)) if kind is int and float(s).is_integer() else kind(s)
        except ValueError:
            raise ValueError(f"sweep: {s!r} in {text!r} is not a valid {kind.__name__}") from None

    if ":" in text and kind not in (str, bool):
        parts = text.split(":")
        log = len(parts) == 3 and parts[2].strip().lower() == "log"
        if len(parts) not in (2, 3) or (len(parts) == 3 and not log):
            raise ValueError(f"sweep: a range is LOW:HIGH or LOW:HIGH:log, got {text!r}")
        return (one(parts[0]), one(parts[1]), log)
    values = [one(s) for s in text.split(",")]
    return values[0] if len(values) == 1 else values
