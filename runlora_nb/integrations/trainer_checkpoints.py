"""Hugging Face ``Trainer`` / TRL checkpoints of an ``apply_runlora`` model as PEFT-format adapters.

Without this, ``Trainer._save`` sees a plain ``PreTrainedModel`` and writes the whole base model
(``model.safetensors``) with RunLoRA's parameter names, a layout ``peft.PeftModel.from_pretrained`` cannot load,
at the base model's size in every ``checkpoint-N/``. :func:`adapter_checkpoints` makes each checkpoint and each
``trainer.save_model(dir)`` an adapter folder written by :func:`~.adapters.save_adapter`
(``adapter_config.json`` + ``adapter_model.safetensors``, plus the tokenizer and ``training_args.bin`` as the
Trainer writes them), and teaches ``resume_from_checkpoint`` and ``load_best_model_at_end`` to read it back.

Why instance hooks and not a ``TrainerCallback``: ``on_save`` fires only after ``_save_checkpoint`` has written
the full weights (the disk and time a callback would then throw away), and no callback takes part in loading:
for a model that is not a ``PeftModel``, ``Trainer._load_from_checkpoint`` wants ``model.safetensors`` or a
sharded index and raises ``Can't find a checkpoint index`` on an adapter folder. PEFT models get the same two
branches inside ``Trainer`` (``_save`` checks ``isinstance(model, PeftModel)``; the load calls
``model.load_adapter``). So the hooks replace ``_save``, ``_load_from_checkpoint`` and ``_load_best_model`` on the
one trainer object: it works for ``Trainer``, ``SFTTrainer`` and any subclass, with no class of ours to inherit.
Optimizer, scheduler, scaler, RNG and trainer state are still saved and restored by the Trainer itself.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Any

import torch

from .adapter_files import WEIGHTS_NAME as ADAPTER_WEIGHTS
from .adapters import load_adapter, save_adapter
from .inject import runlora_layers
from .wrappers import unwrap_model

__all__ = ["adapter_checkpoints", "is_adapter_checkpoint"]

# transformers' names for full-model weights; a folder holding any of them is an ordinary checkpoint
FULL_WEIGHTS = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)
TRAINING_ARGS = "training_args.bin"
MARK = "_runlora_adapter_checkpoints"  # set on a trainer once its hooks are in


def is_adapter_checkpoint(folder: str | os.PathLike) -> bool:
    """Whether ``folder`` holds an adapter (``adapter_model.safetensors``) and no full-model weights."""
    folder = Path(folder)
    return (folder / ADAPTER_WEIGHTS).is_file() and not any((folder / n).exists() for n in FULL_WEIGHTS)


def _is_peft_model(model: torch.nn.Module) -> bool:
    return hasattr(model, "peft_config") and hasattr(model, "base_model")


def _save(trainer: Any, output_dir: str | None = None, state_dict: dict | None = None) -> None:
    """``Trainer._save`` for a RunLoRA model: the adapter, then the tokenizer and the training arguments.

    ``state_dict`` (a full one, gathered by the Trainer under FSDP / DeepSpeed) is not used: the adapter is read
    from the model. Every rank calls :func:`save_adapter` (it gathers sharded adapters; rank 0 writes).
    """
    del state_dict
    output_dir = output_dir if output_dir is not None else trainer.args.output_dir
    save_adapter(trainer.model, output_dir)
    if not trainer.args.should_save:
        return
    tokenizer = trainer.processing_class
    if tokenizer is None:  # the Trainer falls back to the collator's tokenizer too
        tokenizer = getattr(trainer.data_collator, "tokenizer", None)
    if tokenizer is not None:
        tokenizer.save_pretrained(output_dir)
    torch.save(trainer.args, os.path.join(output_dir, TRAINING_ARGS))


def _load_from_checkpoint(trainer: Any, original, resume_from_checkpoint: str, model=None) -> None:
    """An adapter checkpoint is loaded with :func:`load_adapter`; any other goes to the Trainer's own loader."""
    if not is_adapter_checkpoint(resume_from_checkpoint):
        original(resume_from_checkpoint, model)
        return
    load_adapter(model if model is not None else trainer.model, resume_from_checkpoint)


def _load_best_model(trainer: Any, original) -> None:
    best = trainer.state.best_model_checkpoint
    if best is None or not is_adapter_checkpoint(best):
        original()
        return
    load_adapter(trainer.model, best)


def adapter_checkpoints(trainer: Any) -> Any:
    """Make ``trainer``'s checkpoints and ``save_model`` folders PEFT-format adapters; resume reads them.

    Call it once on a built trainer, before ``train()``::

        trainer = adapter_checkpoints(SFTTrainer(model=model, args=args, ...))
        trainer.train()                             # checkpoint-N/ holds adapter_config.json + safetensors
        trainer.train(resume_from_checkpoint=True)  # adapter, optimizer, scheduler and RNG come back

    A ``PeftModel`` is returned untouched: the Trainer already saves and resumes those as adapters. Calling it
    twice is harmless.

    Args:
        trainer: a ``transformers.Trainer`` (or subclass, e.g. TRL's ``SFTTrainer``) whose model has RunLoRA
            layers (:func:`~runlora_nb.apply_runlora`, or a model ``from_peft`` converted and unwrapped).

    Returns:
        The same trainer.

    Raises:
        TypeError: ``trainer`` is not a Trainer, or its model has no RunLoRA layers.
        ValueError: the trainer runs DeepSpeed or the Trainer's FSDP, whose checkpoints these hooks do not
            write (they save the model through their own engines).
    """
    for name in ("_save", "_load_from_checkpoint", "_load_best_model", "args", "model"):
        if not hasattr(trainer, name):
            raise TypeError(
                f"runlora_nb.integrations.trainer_checkpoints: adapter_checkpoints needs a transformers Trainer, "
                f"got {type(trainer).__name__} (no {name!r}); pass the Trainer / SFTTrainer object"
            )
    model = unwrap_model(trainer.model)
    if _is_peft_model(model) or getattr(trainer, MARK, False):
        return trainer
    if not any(True for _ in runlora_layers(model)):
        raise TypeError(
            f"runlora_nb.integrations.trainer_checkpoints: the trainer's {type(model).__name__} has no RunLoRA "
            "layers, so there is no adapter to checkpoint; call apply_runlora(model, r=...) before building the "
            "Trainer"
        )
    engines = [n for n in ("is_deepspeed_enabled", "is_fsdp_enabled") if getattr(trainer, n, False)]
    if engines:
        raise ValueError(
            f"runlora_nb.integrations.trainer_checkpoints: the trainer has {', '.join(engines)}; adapter "
            "checkpoints are written for single-process and DDP runs only. Drop adapter_checkpoints() there, "
            "or train without DeepSpeed / the Trainer's FSDP"
        )
    trainer._save = functools.partial(_save, trainer)
    trainer._load_from_checkpoint = functools.partial(
        _load_from_checkpoint, trainer, trainer._load_from_checkpoint
    )
    trainer._load_best_model = functools.partial(_load_best_model, trainer, trainer._load_best_model)
    setattr(trainer, MARK, True)
    return trainer
