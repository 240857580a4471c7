"""What learning from rewards needs around the losses (lightning_modules/policy_losses.py): a task's reward,
sampled completions packed into a training batch, the per-token log-probs of a batch's completions, and the
reference policy."""

from __future__ import annotations

import copy
import logging
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from datamodules import IGNORE_INDEX
from modeling.supervised import supervised_output

log = logging.getLogger(__name__)


class Reward:
    """A completion's reward: the weighted sum of the numeric scores the task's scorer gives it
    (`objective.reward`: {score key: weight}; e.g. GSM8K's exact_match_flexible), plus `format` x whether the
    scorer found an answer in the task's own answer format (`extracted_strict`, GSM8K's "#### <n>")."""

    def __init__(self, score: Any, weights: Mapping[str, float], format_weight: float = 0.0) -> None:
        if not weights:
            raise ValueError(
                "objective.reward is empty: name at least one score key, e.g. {exact_match: 1.0}"
            )
        self.score, self.weights, self.format_weight = score, dict(weights), format_weight

    def __call__(self, completion: str, reference: Any) -> tuple[float, dict[str, Any]]:
        """The reward of `completion` against `reference`, and the scorer's scores (a score the scorer leaves
        None for this item, e.g. a dialogue turn without an answer to check, counts 0)."""
        scores = self.score(completion, reference)
        numeric = {k for k, v in scores.items() if v is None or isinstance(v, (int, float))}
        unknown = sorted(set(self.weights) - numeric)
        if unknown:
            raise ValueError(
                f"objective.reward.{unknown[0]}: the task's scorer gives no such number; it scores "
                f"{sorted(numeric)}"
            )
        reward = sum(weight * float(scores[key] or 0.0) for key, weight in self.weights.items())
        if self.format_weight:
            reward += self.format_weight * float(scores.get("extracted_strict") is not None)
        return reward, scores

    @property
    def success_key(self) -> str:
        """The score whose 0/1 value is a success for Pass@1 / pass@k: the first weighted key."""
        return next(iter(self.weights))


def completion_batch(
    prompts: list[list[int]], completions: list[list[int]], pad_id: int
) -> dict[str, torch.Tensor]:
    """One right-padded batch [B, T] of each prompt's token ids followed by its completion's, labels on the
    completion only (each row starts at position 0, so every model reads it as it would unpadded)."""
    rows = [prompt + completion for prompt, completion in zip(prompts, completions, strict=True)]
    width = max(map(len, rows))
    input_ids = torch.full((len(rows), width), pad_id)
    labels = torch.full((len(rows), width), IGNORE_INDEX)
    attention_mask = torch.zeros(len(rows), width, dtype=torch.long)
    for row, (prompt, sequence) in enumerate(zip(prompts, rows, strict=True)):
        input_ids[row, : len(sequence)] = torch.tensor(sequence)
        labels[row, len(prompt) : len(sequence)] = torch.tensor(sequence[len(prompt) :])
        attention_mask[row, : len(sequence)] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def completion_log_probs(
    model: nn.Module, batch: dict[str, torch.Tensor], temperature: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """(log-probs [B, K] of the labelled tokens of `batch` under `model`'s next-token distribution at
    `temperature`, as sampling drew them; mask [B, K] of those positions), the output layer run at them only.
    In the model's dtype or float32, whichever is wider."""
    output, targets = supervised_output(model, batch)
    logits = output.logits  # [B, K, V]
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32)) / temperature
    mask = targets != IGNORE_INDEX
    chosen = logits.gather(-1, targets.clamp(min=0)[..., None]).squeeze(-1)  # [B, K]
    return chosen - logits.logsumexp(-1), mask


class ReferencePolicy:
    """The policy a KL penalty or a preference loss measures against: the model as training starts. An
    adapter's base with the adapter disabled where that is the same model (no second copy in memory); else a
    frozen copy, made once (full fine-tuning, or an adapter initialised away from zero, e.g. PiSSA)."""

    def __init__(self, model: nn.Module) -> None:
        self.copy: nn.Module | None = None
        if not _adapter_off_is_start(model):
            log.info("reference policy: a frozen copy of the model as training starts")
            self.copy = copy.deepcopy(model).eval().requires_grad_(False)

    @torch.no_grad()
    def log_probs(
        self, model: nn.Module, batch: dict[str, torch.Tensor], temperature: float = 1.0
    ) -> torch.Tensor:
        """Log-probs [B, K] of the labelled tokens of `batch` under the reference policy."""
        if self.copy is not None:
            self.copy.to(next(model.parameters()).device)
            return completion_log_probs(self.copy, batch, temperature)[0]
        with model.disable_adapter():
            return completion_log_probs(model, batch, temperature)[0]


@torch.no_grad()
def _adapter_off_is_start(model: nn.Module) -> bool:
    """Whether `model` is a peft model whose adapters, disabled, leave the outputs it starts with."""
    if not hasattr(model, "disable_adapter"):
        return False
    probe = torch.arange(1, 9, device=next(model.parameters()).device)[None]  # [1, 8]
    was_training = model.training
    model.eval()
    on = model(input_ids=probe).logits
    with model.disable_adapter():
        off = model(input_ids=probe).logits
    model.train(was_training)
    return torch.equal(on, off)
