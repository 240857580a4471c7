"""The losses of learning from rewards and preferences, as pure functions of log-probabilities: GRPO's
group-relative advantages and clipped objective (Shao et al. 2024) with the normalisations people compare, and
DPO's sigmoid and IPO losses (Rafailov et al. 2023; Azar et al. 2023). The definitions are TRL's
(`GRPOTrainer._compute_loss`, `DPOTrainer._compute_loss`, trl 1.16), pinned to it in tests/test_objectives.py;
written here because TRL's are methods of its Trainer, not functions a LightningModule can call.

Per-token tensors are [B, K]: one row per completion, K positions of which `mask` marks the completion's
tokens (the layout does not change any value: every reduction is over the mask).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

# how GRPO's per-token losses are averaged (TRL's `loss_type`): grpo, the mean over each completion's tokens,
# then over completions; bnpo, over the batch's tokens; dr_grpo, the sum over the batch divided by
# completions x max_completion_length; dapo, the sum divided by the generation batch's tokens per process
GRPO_LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo")
# how rewards are scaled into advantages (TRL's `scale_rewards`): by the group's std, the batch's, or not
REWARD_SCALES = ("group", "batch", "none")
DPO_LOSS_TYPES = ("sigmoid", "ipo")
STD_EPSILON = 1e-4  # added to the std that divides advantages, as TRL


def group_advantages(rewards: torch.Tensor, group_size: int, scale: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Advantages [N] of rewards [N] (N = prompts x group_size, each prompt's completions together): the
    reward minus its group's mean, divided by the std `scale` names (Bessel-corrected); and whether each
    group's rewards have no spread [N] (such a group teaches nothing)."""
    if scale not in REWARD_SCALES:
        raise ValueError(f"objective.scale_rewards={scale!r}: one of {', '.join(REWARD_SCALES)}")
    grouped = rewards.view(-1, group_size)  # [P, G]
    mean = grouped.mean(1).repeat_interleave(group_size)
    group_std = grouped.std(1).repeat_interleave(group_size)
    std = rewards.std().expand_as(rewards) if scale == "batch" else group_std
    advantages = rewards - mean
    if scale != "none":
        advantages = advantages / (std + STD_EPSILON)
    return advantages, torch.isclose(std, torch.zeros_like(std))


@dataclass
class PolicyLoss:
    """A GRPO loss and what a step logs of it (each a 0-d tensor, detached but `loss`)."""

    loss: torch.Tensor
    kl: torch.Tensor  # mean per-token KL to the reference over the completion tokens (0 with beta 0)
    clip_low: torch.Tensor  # share of completion tokens whose ratio was clipped below (negative advantage)
    clip_high: torch.Tensor  # ... above (positive advantage)


def grpo_loss(
    log_probs: torch.Tensor,
    old_log_probs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    loss_type: str = "dapo",
    epsilon_low: float = 0.2,
    epsilon_high: float = 0.2,
    beta: float = 0.0,
    ref_log_probs: torch.Tensor | None = None,
    max_completion_length: int | None = None,
    tokens_per_process: float | None = None,
    kl_importance_correction: bool = True,
) -> PolicyLoss:
    """GRPO's clipped importance-ratio loss of log_probs [B, K] (the policy's, differentiable) against
    old_log_probs [B, K] (the sampling policy's) for advantages [B], plus `beta` x the k3 KL estimate to
    ref_log_probs [B, K] (times the importance ratio with `kl_importance_correction`, TRL's default),
    averaged as `loss_type` says (`max_completion_length` for dr_grpo; for dapo the generation batch's
    completion tokens over all processes divided by their number, default this batch's)."""
    if loss_type not in GRPO_LOSS_TYPES:
        raise ValueError(f"objective.loss_type={loss_type!r}: one of {', '.join(GRPO_LOSS_TYPES)}")
    mask = mask.to(log_probs.dtype)
    ratio = torch.exp(log_probs - old_log_probs)  # [B, K]
    advantages = advantages[:, None]
    clipped = torch.clamp(ratio, 1 - epsilon_low, 1 + epsilon_high)
    per_token = -torch.min(ratio * advantages, clipped * advantages)
    kl = torch.zeros_like(per_token)
    if beta != 0.0:
        if ref_log_probs is None:
            raise ValueError("objective.beta is not 0: the KL term needs the reference policy's log-probs")
        gap = ref_log_probs - log_probs
        kl = torch.exp(gap) - gap - 1
        if kl_importance_correction:
            kl = kl * ratio
        per_token = per_token + beta * kl
    tokens = mask.sum().clamp(min=1.0)
    if loss_type == "grpo":
        loss = ((per_token * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).mean()
    elif loss_type == "bnpo":
        loss = (per_token * mask).sum() / tokens
    elif loss_type == "dr_grpo":
        if max_completion_length is None:
            raise ValueError("loss_type=dr_grpo divides by max_completion_length: pass it")
        loss = (per_token * mask).sum() / (per_token.shape[0] * max_completion_length)
    else:
        normaliser = tokens if tokens_per_process is None else max(tokens_per_process, 1.0)
        loss = (per_token * mask).sum() / normaliser

    def share(where: torch.Tensor) -> torch.Tensor:
        return ((where.to(mask.dtype) * mask).sum() / tokens).detach()

    return PolicyLoss(
        loss,
        ((kl * mask).sum() / tokens).detach(),
        share((ratio < 1 - epsilon_low) & (advantages < 0)),
        share((ratio > 1 + epsilon_high) & (advantages > 0)),
    )


def dpo_loss(
    chosen: torch.Tensor,
    rejected: torch.Tensor,
    ref_chosen: torch.Tensor,
    ref_rejected: torch.Tensor,
    beta: float,
    loss_type: str = "sigmoid",
    chosen_tokens: torch.Tensor | None = None,
    rejected_tokens: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """DPO's loss (mean over pairs) of the summed log-probs [B] of the chosen and rejected responses under the
    policy and the reference, and the implicit rewards beta x (policy - reference) of each [B]. `ipo` averages
    the log-ratios per token (`chosen_tokens`, `rejected_tokens` [B]: the responses' lengths), as TRL does."""
    if loss_type not in DPO_LOSS_TYPES:
        raise ValueError(f"objective.loss_type={loss_type!r}: one of {', '.join(DPO_LOSS_TYPES)}")
    chosen_ratio, rejected_ratio = chosen - ref_chosen, rejected - ref_rejected
    if loss_type == "sigmoid":
        losses = -F.logsigmoid(beta * (chosen_ratio - rejected_ratio))
    else:
        if chosen_tokens is None or rejected_tokens is None:
            raise ValueError("loss_type=ipo averages per token: pass chosen_tokens and rejected_tokens")
        gap = chosen_ratio / chosen_tokens.clamp(min=1) - rejected_ratio / rejected_tokens.clamp(min=1)
        losses = (gap - 1 / (2 * beta)) ** 2
    return losses.mean(), (beta * chosen_ratio).detach(), (beta * rejected_ratio).detach()
