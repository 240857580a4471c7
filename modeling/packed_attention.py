"""Attention within each example of a packed row, at a cost that scales with the examples' lengths.

transformers keeps packed examples apart by a mask: for sdpa and eager a dense [N, N] block-diagonal one over
the whole row of N tokens, and attention over all N x N pairs, most of them masked. Here the row's examples
are known (their lengths), so each runs its own sdpa call on its own [n_i, n_i] block of the mask that
transformers would have built (causal, sliding window or chunked alike): the same outputs, sum n_i^2 work and
memory instead of N^2. A block that is the plain causal triangle goes to sdpa as `is_causal`, its fastest
kernel. The flash-attention backends already attend per example (varlen kernels, from the position ids).

It is registered with transformers as the attention implementation `sdpa_per_example` (attention function and
mask function), which answers exactly like `sdpa` outside a packed forward. `attends_per_example(model)`
switches a model that runs on sdpa to it once it has checked, on the model itself, that it gives the logits of
the dense mask (a model whose attention classes do not go through transformers' attention interface keeps
sdpa and the dense mask); `per_example_attention(lengths)` marks one forward as a packed row of those
examples.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from modeling import architecture

NAME = "sdpa_per_example"
CHECKED_ATTR = "_lmlab_attends_per_example"  # the probe's answer, kept on the model
_LENGTHS: ContextVar[tuple[int, ...] | None] = ContextVar("packed_lengths", default=None)
_SPLIT_CALLS = [0]  # attention calls that ran example by example, for the probe


@dataclass(frozen=True)
class ExampleMasks:
    """The diagonal blocks of a packed row's mask: example i spans [starts[i], starts[i] + len) and attends
    by blocks[i] ([1, 1, n_i, n_i] bool, or None: plainly causal)."""

    starts: tuple[int, ...]
    lengths: tuple[int, ...]
    blocks: tuple[torch.Tensor | None, ...]


def example_masks(
    batch_size: int, q_length: int, kv_length: int, q_offset: int = 0, kv_offset: int = 0, **kwargs: Any
) -> ExampleMasks | torch.Tensor | None:
    """transformers' mask function for NAME: in a packed forward, the examples' own blocks of sdpa's mask;
    otherwise sdpa's mask itself."""
    lengths = _LENGTHS.get()
    whole_row = batch_size == 1 and q_length == kv_length == sum(lengths or ()) and q_offset == kv_offset == 0
    if lengths is None or not whole_row or kwargs.get("attention_mask") is not None:
        return sdpa_mask(batch_size, q_length, kv_length, q_offset, kv_offset, **kwargs)
    kwargs["allow_is_causal_skip"] = False
    starts = tuple(sum(lengths[:i]) for i in range(len(lengths)))
    blocks = []
    for start, length in zip(starts, lengths, strict=True):
        block = sdpa_mask(1, length, length, start, start, **kwargs)  # [1, 1, n, n]
        causal = torch.ones(length, length, dtype=torch.bool, device=block.device).tril()
        blocks.append(None if torch.equal(block[0, 0], causal) else block)
    return ExampleMasks(starts, tuple(lengths), tuple(blocks))


def attention_per_example(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: ExampleMasks | torch.Tensor | None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """transformers' attention function for NAME: query/key/value [1, heads, N, head_dim] attended example by
    example when the mask is ExampleMasks (output [1, N, heads, head_dim]), else sdpa's."""
    if not isinstance(attention_mask, ExampleMasks):
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    _SPLIT_CALLS[0] += 1
    outputs = [
        sdpa_attention_forward(
            module,
            query[:, :, start : start + length],
            key[:, :, start : start + length],
            value[:, :, start : start + length],
            block,
            **kwargs,
        )[0]
        for start, length, block in zip(
            attention_mask.starts, attention_mask.lengths, attention_mask.blocks, strict=True
        )
    ]
    return torch.cat(outputs, dim=1), None


AttentionInterface.register(NAME, attention_per_example)
AttentionMaskInterface.register(NAME, example_masks)


@contextmanager
def per_example_attention(lengths: list[int]) -> Iterator[None]:
    """Within the block, a forward on one packed row of examples of `lengths` attends per example (in a model
    switched to NAME by `attends_per_example`; its recomputation in backward, under activation checkpointing,
    reuses the masks made here)."""
    token = _LENGTHS.set(tuple(lengths))
    try:
        yield
    finally:
        _LENGTHS.reset(token)


def same_logits(split: torch.Tensor, dense: torch.Tensor, dtype: torch.dtype) -> bool:
    """Whether the split attention's logits equal the dense mask's up to the rounding of a model computing in
    `dtype`: within max(1e-4, 4 eps) of the largest dense logit. Kernels that split the row sum in another
    order differ by about 1e-6 of it in float32 over a 30-layer model; attention leaking across examples
    moves the logits by a large share of it."""
    dense = dense.float()
    tolerance = max(1e-4, 4 * torch.finfo(dtype).eps) * dense.abs().max()
    return bool((split.float() - dense).abs().max() <= tolerance)


@torch.no_grad()
def attends_per_example(model: nn.Module) -> bool:
    """Whether `model` attends per example in packed rows: a model on sdpa is switched to NAME (which answers
    like sdpa outside a packed forward) when, on a probe row of three examples, its attention ran example by
    example and gave the logits of the dense mask (`same_logits`); checked once."""
    known = getattr(model, CHECKED_ATTR, None)
    if known is not None:
        return known
    config = model.config
    if config._attn_implementation not in ("sdpa", NAME):
        return False
    config._attn_implementation = "sdpa"
    lengths = [5, 9, 4]
    device = next(model.parameters()).device
    vocab = architecture.input_embeddings(model).num_embeddings
    inputs = {
        "input_ids": torch.tensor([[(7 * i + 3) % vocab for i in range(sum(lengths))]], device=device),
        "position_ids": torch.tensor([[p for n in lengths for p in range(n)]], device=device),
        "use_cache": False,
    }
    was_training = model.training
    model.eval()
    try:
        dense = model(**inputs).logits
        config._attn_implementation = NAME
        calls = _SPLIT_CALLS[0]
        with per_example_attention(lengths):
            split = model(**inputs).logits
        ran_split = _SPLIT_CALLS[0] > calls  # the model's attention went through this module
        agrees = ran_split and same_logits(split, dense, architecture.input_embeddings(model).weight.dtype)
    except (TypeError, ValueError, RuntimeError, AttributeError):  # attention classes outside the interface
        agrees = False
    finally:
        model.train(was_training)
    config._attn_implementation = NAME if agrees else "sdpa"
    setattr(model, CHECKED_ATTR, agrees)
    return agrees
