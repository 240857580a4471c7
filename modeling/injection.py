"""Vectors placed at token positions through the input embedding layer, for any model.

A caller passes placeholder token ids where the vectors go; a forward hook on the model's embedding layer
replaces their embeddings for that one call. Unlike `inputs_embeds`, this needs nothing from the model's
forward, so it serves models whose forward takes only token ids (remote code such as MiniMind) and every other
model alike: the classifier's extra token uses it, and prompt tuning where the forward has no `inputs_embeds`.
"""

from __future__ import annotations

import torch
from torch import nn

from modeling import architecture


class EmbeddingSlots:
    """A hook on `model`'s input embeddings that writes `vectors` at (`rows`, `positions`) in the next call
    only."""

    def __init__(self, model: nn.Module) -> None:
        self.pending: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
        self.handle = architecture.input_embeddings(model).register_forward_hook(self._place)

    def place(self, rows: torch.Tensor, positions: torch.Tensor, vectors: torch.Tensor) -> None:
        """Replace the embeddings at rows[i], positions[i] by vectors[i] ([N], [N], [N, H]) in the next
        forward."""
        self.pending = (rows, positions, vectors)

    def _place(self, module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor | None:
        if self.pending is None:
            return None
        (rows, positions, vectors), self.pending = self.pending, None
        output = output.clone()  # [B, T, H]
        output[rows, positions] = vectors.to(output.dtype)
        return output

    def remove(self) -> None:
        """Detach the hook."""
        self.handle.remove()
