"""LightningModule for the causal-LM objective: SFT with prompt masking (labels IGNORE_INDEX) or pre-training.

Metrics per stage: loss, perplexity, next-token accuracy, top-5 accuracy and the mean probability of the
predicted token (confidence), token-weighted over the epoch (in training, top-5 and confidence use an evenly
strided sample of at most 512 positions per batch, to keep large-vocabulary steps cheap). Training computes
the loss at every step, the other metrics every `metrics.every_n_steps` optimiser steps (their epoch means
average those steps). Optimiser, schedule, the gradient-norm log, the non-finite-loss stop and frozen-base
checkpoints: lightning_modules/base.py.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from omegaconf import DictConfig
from torchmetrics import MeanMetric
from transformers import PreTrainedModel

from datamodules import IGNORE_INDEX
from datamodules.padding_free import model_inputs
from lightning_modules.base import OptimisedModule, module_settings

METRICS = ("loss", "token_acc", "top5_acc", "confidence")
TRAIN_SAMPLE = 512


class CausalLMModule(OptimisedModule):
    """Next-token loss, perplexity and token accuracy for any HF causal LM (plain or peft-wrapped)."""

    def __init__(
        self,
        model: PreTrainedModel,
        lr: float = 2e-4,
        weight_decay: float = 0.0,
        betas: tuple[float, float] = (0.9, 0.999),
        warmup_ratio: float = 0.1,
        metrics_every_n_steps: int = 1,
    ) -> None:
        super().__init__(model, lr, weight_decay, betas, warmup_ratio, metrics_every_n_steps)
        self.model = model
        self.metrics = torch.nn.ModuleDict(
            {f"{stage}_{name}": MeanMetric() for stage in ("train", "val", "test") for name in METRICS}
        )

    @classmethod
    def from_config(cls, model: PreTrainedModel, cfg: DictConfig, datamodule: Any) -> CausalLMModule:
        """The module for a train.py config (`cfg.optim`, `cfg.metrics`); the DataModule is unused here."""
        return cls(model, **module_settings(cfg))

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor | None = None
    ) -> Any:
        return self.model(input_ids=input_ids, attention_mask=attention_mask, labels=labels)

    def _shared_step(self, batch: dict[str, torch.Tensor], stage: str) -> torch.Tensor:
        output = self.model(**model_inputs(batch))  # padded [B, T], or one padding-free row [1, N]
        loss = output.loss
        values = {"loss": loss.detach()}
        target = batch["labels"][:, 1:]
        supervised = target != IGNORE_INDEX  # [B, T-1]
        measured = stage == "train" and self.measures_step()
        if stage != "train" or measured:
            values |= self._token_metrics(output.logits, target, supervised, sample=stage == "train")
        for name, value in values.items():
            metric = self.metrics[f"{stage}_{name}"]
            metric(value, supervised.sum())  # the token-weighted epoch mean
            every_step = stage == "train" and name == "loss"
            self.log(f"{stage}/{name}", metric, on_step=every_step, on_epoch=True, prog_bar=name == "loss")
        if measured:
            self.log_measured(
                {f"train/{name}_step": value for name, value in values.items() if name != "loss"}
            )
        return loss

    @staticmethod
    @torch.no_grad()
    def _token_metrics(
        logits: torch.Tensor, target: torch.Tensor, supervised: torch.Tensor, sample: bool
    ) -> dict[str, torch.Tensor]:
        """Token accuracy, top-5 accuracy and confidence of logits [B, T, V] against target [B, T-1]; with
        `sample`, top-5 and confidence use an evenly strided sample of at most TRAIN_SAMPLE positions."""
        # prompt tuning returns logits for its virtual tokens too: keep the last T positions
        chosen = logits[:, -target.shape[1] - 1 : -1][supervised].float()  # [N, V]
        labels = target[supervised]
        stride = math.ceil(len(labels) / TRAIN_SAMPLE) if sample else 1
        sampled, sampled_labels = chosen[::stride], labels[::stride]
        return {
            "token_acc": (chosen.argmax(-1) == labels).float().mean(),
            "top5_acc": (sampled.topk(5, -1).indices == sampled_labels[:, None]).any(-1).float().mean(),
            "confidence": (sampled.max(-1).values - sampled.logsumexp(-1)).exp().mean(),
        }

    def on_validation_epoch_end(self) -> None:
        self._log_perplexity("val")

    def on_test_epoch_end(self) -> None:
        self._log_perplexity("test")

    def _log_perplexity(self, stage: str) -> None:
        loss = self.metrics[f"{stage}_loss"]
        if loss.update_count:
            self.log(f"{stage}/ppl", math.exp(min(loss.compute().item(), 50.0)))
