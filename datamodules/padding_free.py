"""Padding-free batches: the examples of a batch concatenated into one row, each attending only to itself.

A padded batch [B, T] computes every pad position; a packed one [1, sum of lengths] computes none. The
examples, their order and their supervised tokens are those of the padded batch: `position_ids` restart at 0
at each example, the first label of each example is ignored (in a padded batch it is never a target either: no
token before it predicts it), and no `attention_mask` is passed, so transformers finds the example boundaries
in the position ids and keeps attention inside each example (a block-diagonal causal mask for eager and sdpa,
a block mask that skips the masked blocks for flex attention, the varlen kernels for flash attention). Two
things would silently let attention leak across examples: an all-ones 2-D `attention_mask` passed alongside,
and a KV cache (transformers skips its packed-sequence detection in both cases), so the packed forward passes
neither. The loss (the mean over all supervised tokens of the batch) and its gradients are those of the padded
batch.

Whether a model honours this is checked on the model itself (`keeps_sequences_apart`): two short sequences run
packed and apart must give the same logits. Remote code that ignores position ids (MiniMind), or a peft
prompt-learning model that drops them, fails the check, and its batches stay padded.
"""

from __future__ import annotations

import torch

from datamodules import IGNORE_INDEX


def one_row(examples: list[dict[str, list[int]]]) -> dict[str, torch.Tensor]:
    """One row of the examples' tokens: input_ids, labels, position_ids, each [1, sum of lengths]."""
    input_ids: list[int] = []
    labels: list[int] = []
    positions: list[int] = []
    for example in examples:
        input_ids += example["input_ids"]
        # the first token of an example is no example's target
        labels += [IGNORE_INDEX, *example["labels"][1:]]
        positions += range(len(example["input_ids"]))
    return {
        "input_ids": torch.tensor([input_ids]),
        "labels": torch.tensor([labels]),
        "position_ids": torch.tensor([positions]),
    }


def model_inputs(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor | bool]:
    """The keyword arguments that run a model on a collated batch, padded or packed, with use_cache=False: a
    forward over whole examples reads no cache, and in a packed one a cache would hide the example boundaries
    from transformers."""
    return {**batch, "use_cache": False}


def is_packed(batch: dict[str, torch.Tensor]) -> bool:
    """Whether a collated batch is a packed row (restarting position ids, no attention mask)."""
    return "position_ids" in batch and "attention_mask" not in batch


def example_lengths(batch: dict[str, torch.Tensor]) -> list[int]:
    """The real lengths of a collated batch's examples, in order: a padded batch's from its attention mask, a
    packed row's from where its position ids restart."""
    if not is_packed(batch):
        return batch["attention_mask"].sum(1).tolist()
    starts = (batch["position_ids"][0] == 0).nonzero().squeeze(1).tolist()
    ends = [*starts[1:], batch["position_ids"].shape[1]]
    return [end - start for start, end in zip(starts, ends, strict=True)]


def sequences(batch: dict[str, torch.Tensor]) -> int:
    """The number of examples in a collated batch, packed or padded."""
    return int((batch["position_ids"] == 0).sum()) if is_packed(batch) else batch["input_ids"].shape[0]
