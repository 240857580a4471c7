"""Log-likelihoods of answers under a causal LM: what training's loss, label classification and GradSim
score."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import PreTrainedModel

from datamodules import IGNORE_INDEX
from modeling.supervised import supervised_logits


def answer_log_probs(model: PreTrainedModel, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Summed log-probability of each sequence's supervised tokens (labels != IGNORE_INDEX): [B],
    differentiable; the output layer runs at the supervised positions only."""
    inputs = {name: batch[name] for name in ("input_ids", "attention_mask", "labels")}
    logits, targets = supervised_logits(model, inputs)  # [B, K, V], [B, K]
    token_nll = F.cross_entropy(
        logits.transpose(1, 2).float(), targets, ignore_index=IGNORE_INDEX, reduction="none"
    )
    return -token_nll.sum(-1)


@torch.no_grad()
def label_logprobs(
    model: PreTrainedModel, prompts: list[list[int]], labels: list[list[int]], pad_id: int
) -> torch.Tensor:
    """Summed log P(label tokens | prompt) for every (prompt, label) pair: [len(prompts), len(labels)]."""
    sequences = [prompt + label for prompt in prompts for label in labels]
    targets = [[IGNORE_INDEX] * len(prompt) + label for prompt in prompts for label in labels]
    width = max(map(len, sequences))
    device = next(model.parameters()).device
    batch = {  # right-padded [P*L, T]
        "input_ids": torch.tensor([s + [pad_id] * (width - len(s)) for s in sequences], device=device),
        "attention_mask": torch.tensor(
            [[1] * len(s) + [0] * (width - len(s)) for s in sequences], device=device
        ),
        "labels": torch.tensor([t + [IGNORE_INDEX] * (width - len(t)) for t in targets], device=device),
    }
    return answer_log_probs(model, batch).view(len(prompts), len(labels))
