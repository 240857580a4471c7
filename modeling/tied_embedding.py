"""The gradient of a trained input embedding that shares its weight with the output layer, sent as the rows
of the batch's tokens.

A tied weight [V, H] gets two gradients each step, added by autograd before the optimizer sees it: the output
layer's, dense, and the input embedding's, which PyTorch's dense backward builds by zero-filling a [V, H]
tensor and adding one row per token (a 49k x 576 fill and sum per step for SmolLM2, however short the batch).
Sent sparse (`nn.Embedding.sparse`), the embedding's gradient is those rows alone, added into the output
layer's gradient; the weight's gradient is dense as before and equal up to the order of float additions.
Only for a loss that reads the output layer at every step: a sparse gradient left alone would reach AdamW,
which refuses it. It is switched on at fit start, after a strategy has wrapped the model, so DDP's reducer
expects the dense gradient it gets.
"""

from __future__ import annotations

from torch import nn


def sparse_tied_gradient(model: nn.Module) -> bool:
    """Make `model`'s input embedding send its gradient sparse where it is an `nn.Embedding` whose trained
    weight the output layer shares; whether it did (undo with `dense_gradient`)."""
    embedding, output = model.get_input_embeddings(), model.get_output_embeddings()
    weight = getattr(output, "weight", None)
    if not isinstance(embedding, nn.Embedding) or embedding.sparse or weight is not embedding.weight:
        return False
    if not weight.requires_grad:
        return False
    embedding.sparse = True
    return True


def dense_gradient(model: nn.Module) -> None:
    """Undo `sparse_tied_gradient`: `model`'s input embedding sends its gradient dense."""
    model.get_input_embeddings().sparse = False
