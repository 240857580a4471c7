"""AdaLoRA (Zhang et al. 2023) through peft: SVD-form adapters (P diag(E) Q) whose ranks are pruned from
`init_r` to a mean of `target_r` by an importance score (|w * grad|, smoothed), on a cubic budget schedule
over the run's optimiser steps: `tinit` steps at full rank, pruning every `delta_t` steps, the last `tfinal`
steps at the final ranks. It is the published counterpart of svd_lora, which fixes each rank before training
from the spectrum of the base weights' gradients; AdaLoRA moves the ranks while it trains.

The budget follows the training loop (`AdaLoraHooks`: after every optimiser step, gradients still there),
the orthogonality penalty is added to every training loss, the importance state travels in the training
checkpoint, and the final rank map is written like svd_lora's (`<run dir>/rank_map.json` and its heatmap)."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from peft import AdaLoraConfig, PeftModel
from transformers import PreTrainedModel

from lightning_modules.methods import TRAINING_HOOKS_ATTR, MethodContext, TrainingHooks
from lightning_modules.methods.lora import adapted_model, resolve_targets
from lightning_modules.methods.svd_lora import write_rank_map
from modeling import architecture

SUPPORTS = ("causal_lm", "label_lm")  # the task modules it can train

log = logging.getLogger(__name__)


class AdaLoraHooks(TrainingHooks):
    """Drives peft's rank allocator from the training loop of `model` and writes its final rank map."""

    def __init__(self, model: PeftModel, run_dir: Path | None) -> None:
        self.model, self.run_dir = model, run_dir

    @property
    def allocator(self) -> Any:
        return self.model.base_model.rankallocator

    def on_fit_start(self, total_steps: int) -> None:
        config = self.model.peft_config[self.model.active_adapter]
        if total_steps <= config.tinit + config.tfinal:
            raise ValueError(
                f"method=adalora: the run takes {total_steps} optimiser steps, leaving no pruning phase "
                f"after method.tinit={config.tinit} and before method.tfinal={config.tfinal}; lower them or "
                "train longer"
            )
        self.allocator.set_total_step(total_steps)

    def regulariser(self) -> torch.Tensor:
        """peft's orthogonality penalty, `orth_reg_weight` times the mean over A and B matrices of
        ||A A^T - I||_F and ||B^T B - I||_F (peft adds it only to a loss the model computes from labels)."""
        config = self.model.peft_config[self.model.active_adapter]
        penalties = []
        for name, weight in self.model.named_parameters():
            if weight.requires_grad and ("lora_A" in name or "lora_B" in name):
                covariance = weight @ weight.T if "lora_A" in name else weight.T @ weight  # [r, r]
                identity = torch.eye(covariance.shape[0], dtype=covariance.dtype, device=covariance.device)
                penalties.append(torch.linalg.matrix_norm(covariance - identity))
        return config.orth_reg_weight * torch.stack(penalties).mean()

    def after_optimizer_step(self, step: int) -> None:
        self.model.base_model.update_and_allocate(step)

    def on_fit_end(self) -> None:
        ranks = final_ranks(self.model)
        if self.run_dir is not None and ranks:
            log.info("adalora rank map: %s", write_rank_map(ranks, self.run_dir))

    def state_dict(self) -> dict[str, Any]:
        allocator = self.allocator
        return {
            "ipt": dict(allocator.ipt),
            "exp_avg_ipt": dict(allocator.exp_avg_ipt),
            "exp_avg_unc": dict(allocator.exp_avg_unc),
            "rank_pattern": self.model.peft_config[self.model.active_adapter].rank_pattern,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if not state:
            return
        allocator = self.allocator
        allocator.ipt, allocator.exp_avg_ipt = dict(state["ipt"]), dict(state["exp_avg_ipt"])
        allocator.exp_avg_unc = dict(state["exp_avg_unc"])
        self.model.peft_config[self.model.active_adapter].rank_pattern = state["rank_pattern"]


def final_ranks(model: PeftModel) -> dict[str, int]:
    """Each adapted module's rank now: the count of its kept singular values (all of them before any
    pruning), by module name as svd_lora's rank maps name them."""
    adapter = model.active_adapter
    return {
        name: int((module.lora_E[adapter].detach() != 0).sum())
        for name, module in model.base_model.model.named_modules()
        if adapter in getattr(module, "lora_E", {})
    }


def apply(
    model: PreTrainedModel,
    context: MethodContext,
    init_r: int = 12,
    target_r: int = 8,
    alpha: float = 16,
    dropout: float = 0.05,
    target_modules: Sequence[str] | str | None = None,
    tinit: int = 0,
    tfinal: int = 0,
    delta_t: int = 1,
    beta1: float = 0.85,
    beta2: float = 0.85,
    orth_reg_weight: float = 0.5,
) -> PeftModel:
    """Freeze the base and add AdaLoRA adapters of rank `init_r` on `target_modules` (as method=lora chooses
    them); the run's training loop prunes them to a mean rank of `target_r`."""
    targets = resolve_targets(target_modules, context.model_cfg, model)
    config = AdaLoraConfig(
        init_r=init_r,
        target_r=target_r,
        lora_alpha=alpha,
        lora_dropout=dropout,
        target_modules=targets,
        tinit=tinit,
        tfinal=tfinal,
        deltaT=delta_t,
        beta1=beta1,
        beta2=beta2,
        orth_reg_weight=orth_reg_weight,
        # set from the run's optimiser steps at fit start (AdaLoraHooks); a placeholder that peft accepts
        total_step=tinit + tfinal + 1,
        task_type="CAUSAL_LM",
        fan_in_fan_out=architecture.stores_transposed_linears(model),
    )
    adapted = adapted_model(model, config, "method=adalora")
    setattr(adapted, TRAINING_HOOKS_ATTR, AdaLoraHooks(adapted, context.run_dir))
    return adapted
