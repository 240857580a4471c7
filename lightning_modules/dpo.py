"""DPO (Rafailov et al. 2023) as a LightningModule: the sigmoid or IPO loss of the policy's log-probs of a
chosen and a rejected response against the reference policy's (lightning_modules/policy_losses.py, TRL's
definitions). The reference is the model as training starts, whatever the method: its log-probs of every
pair of every split are computed once when fitting starts and kept in the checkpoints (a resumed run does not
recompute them from trained weights), so no second model is held. Logged per stage: the loss, the implicit
rewards of the chosen and rejected responses, their margin and the share of pairs ranked right."""

from __future__ import annotations

from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from transformers import PreTrainedModel

from datamodules.task import Task
from lightning_modules.base import OptimisedModule, module_settings
from lightning_modules.policy_losses import dpo_loss
from lightning_modules.rollouts import completion_log_probs

CACHE_KEY = "dpo_reference_log_probs"  # the checkpoint entry of the cached reference log-probs


def pair_log_probs(
    model: torch.nn.Module, batch: dict[str, torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed log-probs [2B] of each row's response tokens, their counts [2B]) of a pair batch."""
    inputs = {name: batch[name] for name in ("input_ids", "attention_mask", "labels")}
    log_probs, mask = completion_log_probs(model, inputs)
    return (log_probs * mask).sum(-1), mask.sum(-1)


class DPOModule(OptimisedModule):
    """Direct preference optimisation of any causal LM (plain or peft-wrapped) on (prompt, chosen, rejected)
    pairs."""

    def __init__(
        self,
        model: PreTrainedModel,
        beta: float = 0.1,
        loss_type: str = "sigmoid",
        lr: float = 1e-6,
        weight_decay: float = 0.0,
        betas: tuple[float, float] = (0.9, 0.999),
        warmup_ratio: float = 0.0,
        metrics_every_n_steps: int = 1,
    ) -> None:
        super().__init__(model, lr, weight_decay, betas, warmup_ratio, metrics_every_n_steps)
        self.model, self.beta, self.loss_type = model, beta, loss_type
        self.reference: dict[str, torch.Tensor] = {}  # split: [N, 2] (chosen, rejected) log-probs

    @classmethod
    def from_config(cls, model: PreTrainedModel, cfg: DictConfig, task: Task) -> DPOModule:
        """The module of a train.py config: `objective.beta`, `objective.loss_type`, `optim.*`."""
        objective = OmegaConf.to_container(cfg.objective, resolve=True)
        return cls(model, objective["beta"], objective["loss_type"], **module_settings(cfg))

    @torch.no_grad()
    def on_fit_start(self) -> None:
        """The reference log-probs of every pair of every split the DataModule holds, from the model as it
        starts (unless a checkpoint brought them)."""
        super().on_fit_start()
        if self.reference:
            return
        datamodule, training = self.trainer.datamodule, self.model.training
        self.model.eval()
        for split, examples in datamodule.datasets.items():
            rows = torch.zeros(len(examples), 2, dtype=torch.float64)
            for start in range(0, len(examples), datamodule.eval_batch_size):
                batch = datamodule.collate(examples[start : start + datamodule.eval_batch_size])
                log_probs, _ = pair_log_probs(self.model, {k: v.to(self.device) for k, v in batch.items()})
                rows[batch["index"]] = log_probs.view(2, -1).T.double().cpu()
            self.reference[split] = rows
        self.model.train(training)

    def _shared_step(self, batch: dict[str, torch.Tensor], stage: str) -> torch.Tensor:
        if stage not in self.reference:
            raise RuntimeError(
                f"no reference log-probs for the {stage} split: they are computed when fit starts"
            )
        log_probs, tokens = pair_log_probs(self.model, batch)
        chosen, rejected = log_probs.chunk(2)
        reference = self.reference[stage][batch["index"].cpu()].to(self.device, log_probs.dtype)  # [B, 2]
        chosen_tokens, rejected_tokens = tokens.chunk(2)
        loss, chosen_reward, rejected_reward = dpo_loss(
            chosen, rejected, reference[:, 0], reference[:, 1], self.beta, self.loss_type,
            chosen_tokens, rejected_tokens,
        )  # fmt: skip
        metrics = {
            "loss": loss.detach(),
            "rewards/chosen": chosen_reward.mean(),
            "rewards/rejected": rejected_reward.mean(),
            "rewards/margin": (chosen_reward - rejected_reward).mean(),
            "rewards/accuracy": (chosen_reward > rejected_reward).float().mean(),
        }
        for name, value in metrics.items():
            every_step = stage == "train"
            self.log(f"{stage}/{name}", value, on_step=every_step, on_epoch=True, batch_size=len(chosen),
                     prog_bar=name == "loss", sync_dist=stage != "train")  # fmt: skip
        return loss

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Also keep the reference log-probs."""
        super().on_save_checkpoint(checkpoint)
        checkpoint[CACHE_KEY] = self.reference

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)
        self.reference = checkpoint.get(CACHE_KEY) or {}
