"""Vectors placed at token positions through the input embedding layer, for any model.

A caller passes placeholder token ids where the vectors go; a forward hook on the model's embedding layer
replaces their embeddings for that one call. Unlike `inputs_embeds`, this needs nothing from the model's
forward, so it serves models whose forward takes only token ids (remote code such as MiniMind) and every other
model alike: the classifier's extra token uses it, and prompt tuning where the forward has no `inputs_embeds`
(`attach_embedding_prompt`: the virtual tokens prepended to every input, skipped by decoding steps that
continue from a cache).
"""

from __future__ import annotations

from functools import partial
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedModel

from datamodules import IGNORE_INDEX
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


PROMPT_MODULE = "prompt_embedding"  # where the vectors live on a model without inputs_embeds


class EmbeddingPrompt(nn.Module):
    """The trainable virtual-token vectors of prompt tuning at the embedding layer: weight [V, H]."""

    def __init__(self, num_virtual_tokens: int, width: int) -> None:
        super().__init__()
        self.embedding = nn.Embedding(num_virtual_tokens, width)


def embedding_prompt(model: nn.Module) -> EmbeddingPrompt | None:
    """The EmbeddingPrompt attached to `model`, if prompt tuning runs at its embedding layer."""
    found = getattr(architecture.bare_model(model), PROMPT_MODULE, None)
    return found if isinstance(found, EmbeddingPrompt) else None


def attach_embedding_prompt(model: PreTrainedModel, num_virtual_tokens: int) -> PreTrainedModel:
    """Freeze `model` and prepend `num_virtual_tokens` trainable vectors to every input at its embedding
    layer."""
    width = architecture.input_embeddings(model).embedding_dim
    prompt = EmbeddingPrompt(num_virtual_tokens, width).to(next(model.parameters()).device)
    model.requires_grad_(False)
    model.add_module(PROMPT_MODULE, prompt)
    model.register_forward_pre_hook(partial(_prepend, prompt, EmbeddingSlots(model)), with_kwargs=True)
    return model


def _prepend(
    prompt: EmbeddingPrompt, slots: EmbeddingSlots, module: nn.Module, args: tuple, kwargs: dict[str, Any]
) -> tuple[tuple, dict[str, Any]]:
    if args:  # the token ids given by position
        kwargs, args = {"input_ids": args[0], **kwargs}, args[1:]
    if _holds_tokens(kwargs.get("past_key_values", kwargs.get("cache"))):
        return args, kwargs
    ids = kwargs["input_ids"]  # [B, T]
    count, rows = prompt.embedding.num_embeddings, len(ids)
    # placeholder ids, replaced below
    kwargs["input_ids"] = torch.cat([ids[:, :1].expand(rows, count), ids], 1)
    extensions = {"attention_mask": 1, "labels": IGNORE_INDEX}
    for name, value in extensions.items():
        if kwargs.get(name) is not None:
            kwargs[name] = torch.cat([kwargs[name].new_full((rows, count), value), kwargs[name]], 1)
    if kwargs.get("position_ids") is not None:
        first = torch.arange(count, device=ids.device).expand(rows, count)
        kwargs["position_ids"] = torch.cat([first, kwargs["position_ids"] + count], 1)
    positions = torch.arange(count, device=ids.device)
    slots.place(
        torch.arange(rows, device=ids.device).repeat_interleave(count),
        positions.repeat(rows),
        prompt.embedding.weight.repeat(rows, 1),
    )
    return args, kwargs


def _holds_tokens(cache: Any) -> bool:
    """Whether a cache passed to a forward already holds positions (then the input continues a decoded
    sequence)."""
    if cache is None:
        return False
    if hasattr(cache, "get_seq_length"):
        return cache.get_seq_length() > 0
    return len(cache) > 0 and cache[0] is not None
