"""Full fine-tuning: every parameter trains."""

from __future__ import annotations

from transformers import PreTrainedModel

from lightning_modules.methods import MethodContext
from modeling.quantization import is_quantized

SUPPORTS = ("causal_lm", "label_lm", "classifier")  # the task modules it can train


def apply(model: PreTrainedModel, context: MethodContext) -> PreTrainedModel:
    """Return `model` with every parameter trainable; a quantized base is refused (its weights cannot
    train)."""
    if is_quantized(model):
        raise ValueError(
            "method=full: the base was loaded quantized (model.quantization), and 4-/8-bit weights cannot "
            "train; use a LoRA-family method (QLoRA) or model.quantization=null"
        )
    model.requires_grad_(True)
    return model
