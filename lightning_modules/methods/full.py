"""Full fine-tuning: every parameter trains."""

from __future__ import annotations

from omegaconf import DictConfig
from transformers import PreTrainedModel

from lightning_modules.methods import MethodContext


def apply(
    model: PreTrainedModel, cfg: DictConfig, model_cfg: DictConfig, context: MethodContext | None = None
) -> PreTrainedModel:
    """Return `model` with every parameter trainable."""
    model.requires_grad_(True)
    return model
