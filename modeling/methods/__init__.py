"""Methods turn a built model into the trainable model.

A method is a plain function `apply(model, context, **knobs) -> model` in
`modeling/methods/<name>.py`; its config (conf/method/<name>.yaml) targets it with `_partial_: true`
and lists the knobs, and modeling/registry.py names it. `context` carries what a method may need
beyond the model (the model config, the tokenizer, the task's data, the run dir) and takes back the numbers it
reports (`metrics`). What a method trained is saved and restored by runtime/saved_run.py.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig
from transformers import PreTrainedTokenizerBase


@dataclass
class MethodContext:
    """What a method may use besides the model (its model config, tokenizer, the task's DataModule, the run
    dir), and the metrics it reports back (train.py logs them at step 0)."""

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
