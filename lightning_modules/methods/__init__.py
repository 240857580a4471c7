"""Methods turn a built model into the trainable model.

A method is a plain function `apply(model, context, **knobs) -> model` in `lightning_modules/methods/<name>.py`;
its config (conf/method/<name>.yaml) targets it with `_partial_: true` and lists the knobs, and
lightning_modules/registry.py names it. `context` carries what a method may need beyond the model (the model
config, the tokenizer, the task's data, the run dir) and takes back the numbers it reports (`metrics`).
`export` saves exactly what a method trained; `registry.restore_method` loads it back.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
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
# the base model an export was trained on (lightning_modules.models.base_identity)
BASE_MODEL_FILE = "base_model.json"


@dataclass
class MethodContext:
    """What a method may use besides the model (its model config, tokenizer, the task's DataModule, the run dir),
    and the metrics it reports back (train.py logs them at step 0)."""

    model_cfg: DictConfig | None = None
    tokenizer: PreTrainedTokenizerBase | None = None
    datamodule: Any = None
    run_dir: Path | None = None
    metrics: dict[str, float] = field(default_factory=dict)


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


def read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file; a corrupt or truncated file raises ValueError naming it."""
    try:
        return load_file(path)
    except Exception as error:  # safetensors raises SafetensorError / OSError for damaged files
        raise ValueError(f"{path}: not a readable safetensors file, truncated or corrupt ({error}); re-export it") from error
