"""Full fine-tuning: every parameter trains."""

from __future__ import annotations

from transformers import PreTrainedModel

from modeling.methods import MethodContext


def apply(model: PreTrainedModel, context: MethodContext) -> PreTrainedModel:
    """Return `model` with every parameter trainable."""
    model.requires_grad_(True)
    return model
