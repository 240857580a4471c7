"""Full fine-tuning: every parameter trains."""

from __future__ import annotations

from transformers import PreTrainedModel

from lightning_modules.methods import MethodContext

SUPPORTS = ("causal_lm", "label_lm", "classifier")  # the task modules it can train


def apply(model: PreTrainedModel, context: MethodContext) -> PreTrainedModel:
    """Return `model` with every parameter trainable."""
    model.requires_grad_(True)
    return model
