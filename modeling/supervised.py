"""The training forward that computes only what the loss needs: the output layer on supervised positions.

On GSM8K SFT about a third of the positions carry a label; the output layer (hidden x vocabulary) and its
softmax run at those alone, through the `logits_to_keep` every transformers causal LM takes (a forward that
ignores it is answered by picking the same positions out of its full logits). The loss is the mean
cross-entropy over the supervised tokens, computed in float32: the value and gradients of the model's own
`labels=` loss (tests/test_training_step.py). No KV cache is built in training; a packed row attends per
example (modeling/packed_attention.py).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from datamodules import IGNORE_INDEX
from datamodules.padding_free import example_lengths, is_packed, model_inputs
from modeling.packed_attention import attends_per_example, per_example_attention


def kept_positions(labels: torch.Tensor) -> torch.Tensor:
    """Positions of labels [B, T] whose next token is a target in some row: [K] indices counted from the end
    (t - T), so a method that prepends virtual tokens to the sequence keeps the same ones."""
    supervised = (labels[:, 1:] != IGNORE_INDEX).any(0)  # [T-1]
    return supervised.nonzero().squeeze(1) - labels.shape[1]


def supervised_logits(model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits [B, K, V] at the kept positions of `batch`, their targets [B, K], IGNORE_INDEX where a row has
    no target there), from one forward of `model` without labels or cache."""
    output, targets = supervised_output(model, batch)
    return output.logits, targets


def supervised_output(
    model: nn.Module, batch: dict[str, torch.Tensor], **extra: Any
) -> tuple[Any, torch.Tensor]:
    """(the model's output, its `logits` [B, K, V] at the kept positions; their targets [B, K]) from one
    forward of `model` on `batch` without labels or cache, `extra` passed to the forward."""
    labels = batch["labels"]
    keep = kept_positions(labels)
    inputs = {name: value for name, value in model_inputs(batch).items() if name != "labels"} | extra
    if is_packed(batch) and attends_per_example(model):
        with per_example_attention(example_lengths(batch)):
            output = model(**inputs, logits_to_keep=keep)
    else:
        output = model(**inputs, logits_to_keep=keep)
    if output.logits.shape[1] != len(keep):  # a forward that returned every position
        output.logits = output.logits[:, keep]
    return output, labels[:, keep + labels.shape[1] + 1]


def token_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy (float32) of logits [B, K, V] over the targets [B, K] that are not IGNORE_INDEX."""
    return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX)
