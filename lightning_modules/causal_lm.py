"""LightningModule for the causal-LM objective: SFT with prompt masking (labels IGNORE_INDEX) or pre-training.

Metrics per stage: loss, perplexity, next-token accuracy, top-5 accuracy and the mean probability of the
predicted token (confidence), token-weighted over the epoch (in training, top-5 and confidence use an evenly
strided sample of at most 512 positions per batch, to keep large-vocabulary steps cheap). The output layer
runs at the supervised positions only (modeling/supervised.py), and the metrics come from those logits.
Training computes the loss at every step, the other metrics every `metrics.every_n_steps` optimiser steps
(their epoch means average those steps). Each batch's FLOPs are counted for the ThroughputMonitor
(modeling/flops.py). Optimiser, schedule, the gradient-norm log, the non-finite-loss stop and frozen-base
checkpoints: lightning_modules/base.py."""

from __future__ import annotations

import logging
import math
from contextlib import nullcontext
from typing import Any

import torch
from omegaconf import DictConfig
from torchmetrics import MeanMetric
from transformers import PreTrainedModel

from datamodules import IGNORE_INDEX
from datamodules.padding_free import example_lengths
from datamodules.task import Task
from lightning_modules.base import OptimisedModule, module_settings
from modeling.experts import ExpertLoad, aux_loss_weight, router_inputs
from modeling.flops import batch_flops
from modeling.supervised import supervised_output, token_loss

METRICS = ("loss", "token_acc", "top5_acc", "confidence")
log = logging.getLogger(__name__)
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
        router_aux_loss_coef: float | None = None,
        imbalance_factor: float = 2.0,
    ) -> None:
        super().__init__(model, lr, weight_decay, betas, warmup_ratio, metrics_every_n_steps)
        self.model = model
        self.aux_weight = aux_loss_weight(model, router_aux_loss_coef)  # 0: no experts, or turned off
        self.router_inputs = router_inputs(model) if self.aux_weight else {}
        self.expert_load, self.imbalance_factor = ExpertLoad(model), imbalance_factor
        self.imbalanced: set[int] = set()  # the MoE layers warned about
        self.metrics = torch.nn.ModuleDict(
            {f"{stage}_{name}": MeanMetric() for stage in ("train", "val", "test") for name in METRICS}
        )

    @classmethod
    def from_config(cls, model: PreTrainedModel, cfg: DictConfig, task: Task) -> CausalLMModule:
        """The module for a train.py config (`cfg.optim`, `cfg.metrics`, `cfg.moe`); the task is unused
        here."""
        return cls(model, **module_settings(cfg), **cfg.moe)

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor | None = None
    ) -> Any:
        return self.model(input_ids=input_ids, attention_mask=attention_mask, labels=labels)

    def batch_flops(self, batch: dict[str, torch.Tensor], supervised: torch.Tensor, backward: bool) -> int:
        """FLOPs of a batch: every example's forward (and backward), the output layer at the supervised
        positions only."""
        return batch_flops(self.flop_counts, example_lengths(batch), int(supervised.sum()), backward)

    def _shared_step(self, batch: dict[str, torch.Tensor], stage: str) -> torch.Tensor:
        measured = stage == "train" and self.measures_step()
        routed = self.expert_load.routers and measured
        # padded [B, T], or one padding-free row [1, N]; the output layer at supervised positions only
        with self.expert_load.counting(batch.get("attention_mask")) if routed else nullcontext():
            output, targets = supervised_output(self.model, batch, **self.router_inputs)
        logits = output.logits  # [B, K, V], targets [B, K]
        loss = token_loss(logits, targets)
        values = {"loss": loss.detach()}
        supervised = targets != IGNORE_INDEX  # [B, K]
        self.counted = (batch, supervised, stage == "train")  # counted only if flops_per_batch is read
        if stage == "train" and self.aux_weight and getattr(output, "aux_loss", None) is not None:
            aux_loss = self.aux_weight * output.aux_loss  # optimised with the cross-entropy, logged apart
            self.log("train/aux_loss", aux_loss.detach(), on_step=True, on_epoch=True)
            loss = loss + aux_loss
        if routed:
            self._log_expert_load()
        if stage != "train" or measured:
            values |= self._token_metrics(logits, targets, supervised, sample=stage == "train")
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
        logits: torch.Tensor, targets: torch.Tensor, supervised: torch.Tensor, sample: bool
    ) -> dict[str, torch.Tensor]:
        """Token accuracy, top-5 accuracy and confidence of the kept logits [B, K, V] against targets [B, K];
        with `sample`, top-5 and confidence use an evenly strided sample of at most TRAIN_SAMPLE positions
        (only those rows of the logits are copied)."""
        labels = targets[supervised]  # [N]
        predicted = logits.argmax(-1)[supervised]  # [N], without copying the [N, V] logits
        stride = math.ceil(len(labels) / TRAIN_SAMPLE) if sample else 1
        rows = supervised.flatten().nonzero().squeeze(1)[::stride]  # [n] of the B * K positions
        sampled, sampled_labels = logits.flatten(0, 1)[rows].float(), labels[::stride]  # [n, V], [n]
        return {
            "token_acc": (predicted == labels).float().mean(),
            "top5_acc": (sampled.topk(5, -1).indices == sampled_labels[:, None]).any(-1).float().mean(),
            "confidence": (sampled.max(-1).values - sampled.logsumexp(-1)).exp().mean(),
        }

    def _log_expert_load(self) -> None:
        """Each MoE layer's share of tokens per expert; a warning the first time one expert of a layer takes
        more than `imbalance_factor` times the balanced share (top-k / experts)."""
        shares = self.expert_load.shares()
        self.log_measured(
            {
                f"train/expert_load/layer_{layer}/expert_{e}": s
                for layer, share in shares.items()
                for e, s in enumerate(share)
            }
        )
        for layer, share in shares.items():
            balanced = self.expert_load.top_k / len(share)
            if layer not in self.imbalanced and float(share.max()) > self.imbalance_factor * balanced:
                self.imbalanced.add(layer)
                log.warning(
                    "MoE layer %d: expert %d took %.0f%% of the tokens at step %d (balanced: %.0f%%; "
                    "moe.imbalance_factor=%s); the router may be collapsing: check train/expert_load and "
                    "moe.router_aux_loss_coef",
                    layer,
                    int(share.argmax()),
                    100 * float(share.max()),
                    self.global_step,
                    100 * balanced,
                    self.imbalance_factor,
                )

    def on_validation_epoch_end(self) -> None:
        self._log_perplexity("val")

    def on_test_epoch_end(self) -> None:
        self._log_perplexity("test")

    def _log_perplexity(self, stage: str) -> None:
        loss = self.metrics[f"{stage}_loss"]
        if loss.update_count:
            self.log(f"{stage}/ppl", math.exp(min(loss.compute().item(), 50.0)))
