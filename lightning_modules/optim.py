"""The optimiser and schedule every lmlab LightningModule uses, and the frozen-base checkpoint filter."""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
from transformers import get_cosine_schedule_with_warmup


def adamw_with_cosine(
    module: L.LightningModule, lr: float, weight_decay: float, betas: tuple[float, float], warmup_ratio: float
) -> dict[str, Any]:
    """AdamW over the trainable parameters (no decay on 1-D ones), linear warmup then cosine decay per step."""
    decay, no_decay = [], []
    for parameter in module.parameters():
        if parameter.requires_grad:
            (decay if parameter.ndim >= 2 else no_decay).append(parameter)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    optimizer = torch.optim.AdamW([g for g in groups if g["params"]], lr=lr, betas=tuple(betas))
    total = max(1, int(module.trainer.estimated_stepping_batches))
    scheduler = get_cosine_schedule_with_warmup(optimizer, int(warmup_ratio * total), total)
    return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def trainable_only(module: torch.nn.Module, state: dict[str, torch.Tensor], prefix: str = "") -> dict[str, torch.Tensor]:
    """The entries of `state` (a state_dict of `module`) that are trainable parameters."""
    trainable = {prefix + name for name, p in module.named_parameters() if p.requires_grad}
    return {key: value for key, value in state.items() if key in trainable}


def log_grad_norm(module: L.LightningModule) -> None:
    """Log the total gradient norm of `module` as train/grad_norm."""
    gradients = [p.grad for p in module.parameters() if p.grad is not None]
    if gradients:
        module.log("train/grad_norm", torch.nn.utils.get_total_norm(gradients))
