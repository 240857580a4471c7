"""Methods turn a built model into the trainable model.

Each method module exposes `apply(model, cfg, model_cfg, context=None)`; `context` carries what a
method may need beyond the model (the tokenizer, the task's data, the run dir). `export` and
`restore` save and reload exactly what a method trained, whatever the method.
"""

from __future__ import annotations

import importlib
import json
import pkgutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from peft import PeftModel
from safetensors.torch import load_file, save_file
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from lightning_modules.models import BASE_IDENTITY_ATTR

TRAINABLE_FILE = "trainable.safetensors"
METHOD_FILE = "method.json"
# numbers a method reports about itself (e.g. svd_lora's ranks); train.py logs them to every logger at step 0
METHOD_METRICS_FILE = "method_metrics.json"
# the base model an export was trained on (lightning_modules.models.base_identity)
BASE_MODEL_FILE = "base_model.json"


class UnknownMethodError(ValueError):
    """A config or checkpoint names a method that is not one of lmlab's method modules."""


def method_names() -> list[str]:
    """The registered methods: the modules of this package."""
    return sorted(module.name for module in pkgutil.iter_modules(__path__))


def resolve_apply(dotted: str, where: str) -> Callable[..., PreTrainedModel]:
    """The `apply` function named by `dotted`, only when it is `lightning_modules.methods.<registered name>.apply`:
    a checkpoint's method.json can select one of lmlab's methods, never run any other importable function."""
    prefix, _, name = dotted.removesuffix(".apply").rpartition(".")
    if prefix != __name__ or name not in method_names() or not dotted.endswith(".apply"):
        raise UnknownMethodError(
            f"{where}: '{dotted}' is not a registered lmlab method; apply must be "
            f"{__name__}.<name>.apply with <name> one of {method_names()}"
        )
    return importlib.import_module(f"{__name__}.{name}").apply


@dataclass
class MethodContext:
    """What a method may use besides the model: tokenizer, the task's DataModule, the run dir."""

    tokenizer: PreTrainedTokenizerBase | None = None
    datamodule: Any = None
    run_dir: Path | None = None


def count_parameters(model: torch.nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return trainable, total


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The trainable parameters by name, detached and contiguous (what a frozen-base method saves)."""
    return {name: p.detach().contiguous() for name, p in model.named_parameters() if p.requires_grad}


def export(model: PreTrainedModel, method_cfg: DictConfig, target: Path) -> None:
    """Save what training changed: a peft adapter, the whole model (full), or the trainable weights + method."""
    target.mkdir(parents=True, exist_ok=True)
    identity = getattr(model, BASE_IDENTITY_ATTR, None)
    if identity is not None:
        (target / BASE_MODEL_FILE).write_text(json.dumps(identity, indent=2) + "\n")
    trainable, total = count_parameters(model)
    if isinstance(model, PeftModel) or trainable == total:
        model.save_pretrained(target, safe_serialization=True)
        return
    state = trainable_state(model)
    if state:
        save_file(state, target / TRAINABLE_FILE)
    (target / METHOD_FILE).write_text(json.dumps(OmegaConf.to_container(method_cfg, resolve=True), indent=2) + "\n")


def restore(base: PreTrainedModel, directory: Path, model_cfg: DictConfig) -> PreTrainedModel:
    """Re-apply the method saved by `export` in `directory` to `base` and load its trained weights."""
    method_cfg = OmegaConf.create(json.loads((directory / METHOD_FILE).read_text()))
    model = resolve_apply(str(method_cfg.get("apply")), str(directory / METHOD_FILE))(base, method_cfg, model_cfg, None)
    if (directory / TRAINABLE_FILE).exists():
        state = read_safetensors(directory / TRAINABLE_FILE)
        expected = set(trainable_state(model))
        if set(state) != expected:
            raise ValueError(
                f"{directory / TRAINABLE_FILE}: saved weights do not match method '{method_cfg.name}' on this model "
                f"(missing {sorted(expected - set(state))[:3]}, unexpected {sorted(set(state) - expected)[:3]})"
            )
        model.load_state_dict(state, strict=False)
    return model


def read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file; a corrupt or truncated file raises ValueError naming it."""
    try:
        return load_file(path)
    except Exception as error:  # safetensors raises SafetensorError / OSError for damaged files
        raise ValueError(f"{path}: not a readable safetensors file, truncated or corrupt ({error}); re-export it") from error
