"""The FLOPs a batch costs a causal LM, counted from the batch itself, and the device's peak to compare with.

The count is of the useful work: real tokens (no padding), each example's own attention, the output layer at
the supervised positions only (modeling/supervised.py). Per real token, every matrix of the decoder blocks
(attention and MLP projections, adapters included) costs 2 FLOPs per weight forward; backward costs as much
again for the gradients of the activations, and as much again for the gradients of the weights that train.
Attention scores and their weighted sum cost 4 * n^2 * width per layer forward for an example of n tokens
(the full square, as PaLM's appendix B counts it), twice that backward. The output layer costs 2 * vocab *
hidden per supervised position forward, the same backward for the activations and again if it trains.
A projection-head classifier's head costs 2 FLOPs per weight per example forward, twice that backward.
"""

from __future__ import annotations

import functools
import time
from dataclasses import dataclass

import torch
from torch import nn

from modeling import architecture


@dataclass(frozen=True)
class FlopCounts:
    """A model's per-token weights in its decoder blocks (all, and those that train), the output layer's
    size and whether it trains, and the attention width and depth."""

    block_weights: int
    trainable_block_weights: int
    output_weights: int
    output_trains: bool
    attention_width: int
    attention_layers: int


def flop_counts(model: nn.Module) -> FlopCounts:
    """What `model`'s FLOPs per token depend on, read from its parameters and config."""
    blocks = architecture.decoder_blocks(model)
    matrices = [p for block in blocks for p in block.parameters() if p.ndim >= 2]
    output = model.get_output_embeddings()
    config = model.config
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return FlopCounts(
        block_weights=sum(p.numel() for p in matrices),
        trainable_block_weights=sum(p.numel() for p in matrices if p.requires_grad),
        output_weights=0 if output is None else output.weight.numel(),
        output_trains=output is not None and output.weight.requires_grad,
        attention_width=heads * head_dim,
        attention_layers=len(blocks),
    )


def batch_flops(counts: FlopCounts, lengths: list[int], supervised: int, backward: bool) -> int:
    """FLOPs of a forward (and with `backward`, a backward) over examples of `lengths` real tokens with
    `supervised` target positions."""
    tokens = sum(lengths)
    squares = sum(n * n for n in lengths)
    blocks = 2 * counts.block_weights * tokens
    attention = 4 * squares * counts.attention_width * counts.attention_layers
    output = 2 * counts.output_weights * supervised
    total = blocks + attention + output
    if backward:
        total += blocks + 2 * counts.trainable_block_weights * tokens + 2 * attention
        total += output * (2 if counts.output_trains else 1)
    return total


def classifier_batch_flops(
    counts: FlopCounts,
    lengths: list[int],
    head_weights: int,
    output_positions: int,
    backward: bool,
    through_backbone: bool,
) -> int:
    """FLOPs of a projection-head classifier over examples of `lengths` real tokens: the backbone forward
    (its output layer at `output_positions`, outside the gradient's path), the head once per example; backward
    through the head, and through the backbone when something in it trains (`through_backbone`)."""
    backbone = batch_flops(counts, lengths, 0, backward and through_backbone)
    head = 2 * head_weights * len(lengths)
    return backbone + 2 * counts.output_weights * output_positions + head * (3 if backward else 1)


@functools.cache
def measured_peak_flops(device: torch.device, size: int = 1024, repeats: int = 5) -> float:
    """The float32 matmul rate (FLOP/s) measured on `device`: the best of `repeats` [size, size] products.
    Draws from a generator of its own: a run's random stream is the same whether this ran or not."""
    generator = torch.Generator(device).manual_seed(0)
    a, b = (torch.randn(size, size, device=device, generator=generator) for _ in range(2))
    best = float("inf")
    for _ in range(repeats + 1):  # the first is a warm-up
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        a @ b
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best
