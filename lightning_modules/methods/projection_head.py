"""Projection-head classifier: the backbone stays frozen; only the head trains.

The head itself, its inputs and its save / restore are modeling/classifier_head.py (evaluation and
analysis read it without Lightning); the `classifier` LightningModule (lightning_modules/classifier.py), which
this method brings, trains it with cross-entropy."""

from __future__ import annotations

from transformers import PreTrainedModel

from lightning_modules.methods import MethodContext

SUPPORTS = ("classifier",)  # the task modules it can train
MODULE = "classifier"  # the task module that holds the head


def apply(model: PreTrainedModel, context: MethodContext) -> PreTrainedModel:
    """Return `model` with every parameter frozen (the classifier head adds the trainable ones)."""
    model.requires_grad_(False)
    return model
