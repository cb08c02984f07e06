"""Chat A/B: the same prompt to two sides (base and tuned model, or two runs' adapters), tokens streamed.

:class:`ChatAB` holds the state and the events; it imports no widgets (the Chat panel in ``runlora_nb.widgets``
is a thin view over it). Generation uses transformers' own ``TextIteratorStreamer``: ``generate`` runs in a worker
thread and the streamer hands out text pieces as tokens are decoded. The sides run one after the other in one
background thread (:meth:`ChatAB.start`), so a side that toggles adapters off on a shared model (base vs tuned)
never races the other; the kernel stays free, and :meth:`ChatAB.stop` ends the running generation at the next
token through a ``StoppingCriteria``.

Events (``subscribe(fn)``, ``fn(kind, payload)``): ``"start"`` (prompt), ``"token"`` ((side, piece)),
``"side_done"`` (a :class:`SideResult`), ``"done"`` (dict side → SideResult), ``"error"`` (traceback text).
"""

from __future__ import annotations

import contextlib
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..integrations.adapter_switch import adapters_disabled

__all__ = ["ChatAB", "ChatSettings", "SideResult", "base_vs_tuned"]

ContextFactory = Callable[[], contextlib.AbstractContextManager]


@dataclass
class ChatSettings:
    """Decoding settings shared by both sides.

    Attributes:
        max_new_tokens: new tokens per side.
        do_sample: sample (True) or greedy (False: the same prompt gives the same text).
        temperature, top_p: sampling settings (ignored when greedy).
        seed: torch seed before each side (sampling then differs only by the model).
        chat_template: apply the tokenizer's chat template when it has one.
        system: an optional system message for the chat template.
    """

    max_new_tokens: int = 64
    do_sample: bool = False
    temperature: float = 0.7
    top_p: float = 0.9
    seed: int = 0
    chat_template: bool = True
    system: str | None = None

    def __post_init__(self) -> None:
        if (
            not isinstance(self.max_new_tokens, int)
            or isinstance(self.max_new_tokens, bool)
            or self.max_new_tokens <= 0
        ):
            raise ValueError(
                f"ChatSettings: max_new_tokens must be a positive int, got {self.max_new_tokens!r}"
            )
        if not (self.temperature > 0):
            raise ValueError(f"ChatSettings: temperature must be > 0, got {self.temperature!r}")
        if not (0 < self.top_p <= 1):
            raise ValueError(f"ChatSettings: top_p must be in (0, 1], got {self.top_p!r}")


@dataclass
class SideResult:
    """What one side answered: its name, the text, new tokens, seconds, tokens/s, and whether Stop cut it."""

    side: str
    text: str
    new_tokens: int
    seconds: float
    stopped: bool = False

    @property
    def tokens_per_s(self) -> float:
        return self.new_tokens / self.seconds if self.seconds > 0 else 0.0


@dataclass
class _Side:
    model: nn.Module
    context: ContextFactory


def base_vs_tuned(model: nn.Module) -> dict[str, tuple[nn.Module, ContextFactory]]:
    """Sides for one tuned model: ``"base"`` (every adapter off, restored after) and ``"tuned"``."""
    return {"base": (model, lambda: adapters_disabled(model)), "tuned": (model, contextlib.nullcontext)}


class _StopFlag:
    """A ``StoppingCriteria`` (duck-typed: transformers calls it with input_ids and scores after every new
    token) that ends generation once Stop was pressed, and counts the tokens for the progress line."""

    def __init__(self, event: threading.Event, on_token: Callable[[], None]) -> None:
        self.event, self.on_token = event, on_token

    def __call__(self, input_ids, scores, **kwargs) -> torch.Tensor:
        self.on_token()
        return torch.full((input_ids.shape[0],), self.event.is_set(), dtype=torch.bool)


class ChatAB:
    """Send one prompt to two (or more) sides and stream their answers.

    Args:
        tokenizer: the tokenizer shared by the sides.
        sides: name → (model, context factory); default :func:`base_vs_tuned` of ``model``.
        model: a tuned model (RunLoRA or PEFT adapters) when ``sides`` is not given.
        settings: a :class:`ChatSettings` (or use :meth:`set`).

    Raises:
        ValueError: neither ``sides`` nor ``model``, or fewer than two sides.
    """

    def __init__(
        self,
        tokenizer: Any,
        sides: dict[str, tuple[nn.Module, ContextFactory]] | None = None,
        *,
        model: nn.Module | None = None,
        settings: ChatSettings | None = None,
    ) -> None:
        if sides is None:
            if model is None:
                raise ValueError(
                    "ChatAB: give model= (a tuned model: base vs tuned) or sides={name: (model, ctx)}"
                )
            sides = base_vs_tuned(model)
        if len(sides) < 2:
            raise ValueError(f"ChatAB: an A/B chat needs two sides, got {list(sides)}")
        self.tokenizer = tokenizer
        self.sides = {name: _Side(m, ctx) for name, (m, ctx) in sides.items()}
        self.settings = settings or ChatSettings()
        self.results: dict[str, SideResult] = {}
        self.texts: dict[str, str] = {name: "" for name in self.sides}
        self.generated: dict[str, int] = {
            name: 0 for name in self.sides
        }  # tokens so far (a text piece may lag)
        self.error: str | None = None
        self._listeners: list[Callable[[str, Any], None]] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    # ---------------------------------------------------------------------------------------------- state
    def subscribe(self, fn: Callable[[str, Any], None]) -> Callable[[], None]:
        """``fn(kind, payload)`` for every event; returns an unsubscribe function."""
        self._listeners.append(fn)
        return lambda: self._listeners.remove(fn) if fn in self._listeners else None

    def _emit(self, kind: str, payload: Any) -> None:
        for fn in list(self._listeners):
            fn(kind, payload)

    def set(self, **changes: Any) -> ChatSettings:
        """Change decoding settings (validated; refused while a chat runs)."""
        if self.running:
            raise RuntimeError("ChatAB: a chat is running; Stop it before changing the settings")
        fields = {**self.settings.__dict__, **changes}
        unknown = set(changes) - set(ChatSettings.__dataclass_fields__)
        if unknown:
            raise ValueError(f"ChatAB.set: unknown setting {sorted(unknown)[0]!r}; known: {sorted(fields)}")
        self.settings = ChatSettings(**fields)
        return self.settings

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    # ---------------------------------------------------------------------------------------------- running
    def encode(self, prompt: str) -> dict[str, torch.Tensor]:
        """The prompt as model inputs, through the chat template when the tokenizer has one (and it is on)."""
        tok, s = self.tokenizer, self.settings
        if s.chat_template and getattr(tok, "chat_template", None):
            messages = ([{"role": "system", "content": s.system}] if s.system else []) + [
                {"role": "user", "content": prompt}
            ]
            ids = tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt")
            if not isinstance(ids, torch.Tensor):  # newer tokenizers return a BatchEncoding
                ids = ids["input_ids"]
            return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
        enc = tok(prompt, return_tensors="pt")
        return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}

    def start(self, prompt: str) -> threading.Thread:
        """Answer ``prompt`` on every side in a background thread (the kernel keeps handling widgets)."""
        if not isinstance(prompt, str) or not prompt.strip():
            raise ValueError("ChatAB: the prompt is empty; type a question first")
        with self._lock:
            if self.running:
                raise RuntimeError("ChatAB: a chat is already running; Stop it first")
            self._stop.clear()
            self.results, self.error = {}, None
            self.texts = {name: "" for name in self.sides}
            self.generated = {name: 0 for name in self.sides}
            self._thread = threading.Thread(
                target=self._run_all, args=(prompt,), name="runlora-chat", daemon=True
            )
            self._thread.start()
        return self._thread

    def run(self, prompt: str) -> dict[str, SideResult]:
        """Answer ``prompt`` in the calling thread; returns side → :class:`SideResult`."""
        self.start(prompt).join()
        if self.error:
            raise RuntimeError(f"ChatAB: generation failed:\n{self.error}")
        return self.results

    def stop(self) -> None:
        """End the running generation at its next token; the remaining sides are skipped."""
        self._stop.set()

    def join(self, timeout: float | None = None) -> bool:
        if self._thread is not None:
            self._thread.join(timeout)
        return not self.running

    def _run_all(self, prompt: str) -> None:
        self._emit("start", prompt)
        try:
            for name in self.sides:
                if self._stop.is_set():
                    break
                self.results[name] = result = self._run_side(name, prompt)
                self._emit("side_done", result)
        except Exception:
            self.error = traceback.format_exc()
            self._emit("error", self.error)
            return
        self._emit("done", dict(self.results))

    def _count(self, name: str) -> None:
        self.generated[name] += 1

    def _run_side(self, name: str, prompt: str) -> SideResult:
        from transformers import StoppingCriteriaList, TextIteratorStreamer

        side, s = self.sides[name], self.settings
        inputs = self.encode(prompt)
        device = next(side.model.parameters()).device
        inputs = {k: v.to(device) for k, v in inputs.items()}
        streamer = TextIteratorStreamer(
            self.tokenizer, skip_prompt=True, skip_special_tokens=True, timeout=600
        )
        kwargs: dict[str, Any] = {
            **inputs,
            "max_new_tokens": s.max_new_tokens,
            "do_sample": s.do_sample,
            "streamer": streamer,
            "stopping_criteria": StoppingCriteriaList([_StopFlag(self._stop, lambda: self._count(name))]),
            "pad_token_id": self.tokenizer.pad_token_id or self.tokenizer.eos_token_id,
        }
        if s.do_sample:
            kwargs.update(temperature=s.temperature, top_p=s.top_p)
        out: dict[str, Any] = {}

        def generate() -> None:
            try:
                with side.context(), torch.no_grad():
                    torch.manual_seed(s.seed)
                    out["ids"] = side.model.generate(**kwargs)
            except Exception as exc:  # the streamer must still end, or the reader would wait forever
                out["error"] = exc
                streamer.end()

        t0 = time.perf_counter()
        worker = threading.Thread(target=generate, name=f"runlora-chat-{name}", daemon=True)
        worker.start()
        for piece in _pieces(streamer):
            self.texts[name] += piece
            self._emit("token", (name, piece))
        worker.join()
        if "error" in out:
            raise out["error"]
        seconds = time.perf_counter() - t0
        new = int(out["ids"].shape[-1] - inputs["input_ids"].shape[-1])
        return SideResult(name, self.texts[name], new, seconds, stopped=self._stop.is_set())


def _pieces(streamer) -> Iterator[str]:
    for piece in streamer:
        if piece:
            yield piece
