"""Projection-head classifier: the backbone stays frozen; only the classifier head trains.

The head itself (pooling, LayerNorm -> Linear -> activation -> Dropout -> Linear) belongs to the
`classifier` LightningModule (modeling/classifier.py), which this method selects.
"""

from __future__ import annotations

from transformers import PreTrainedModel

from modeling.methods import MethodContext


def apply(model: PreTrainedModel, context: MethodContext) -> PreTrainedModel:
    """Return `model` with every parameter frozen (the classifier head adds the trainable ones)."""
    model.requires_grad_(False)
    return model
