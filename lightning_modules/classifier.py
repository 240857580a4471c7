"""LightningModule that trains a classifier over a (frozen) causal-LM backbone with cross-entropy: the
projection head (modeling/classifier_head.py) on the pooled last token; accuracy, macro F1
and the confusion matrix per stage (lightning_modules/classification_metrics.py)."""

from __future__ import annotations

from pathlib import Path

import torch
from omegaconf import DictConfig
from torch import nn
from torchmetrics import MeanMetric
from transformers import PreTrainedModel

from datamodules.task import Task
from lightning_modules.base import OptimisedModule, module_settings
from lightning_modules.classification_metrics import ClassificationMetrics, log_classification_epoch
from modeling import classifier_head
from modeling.classifier_head import SequenceClassifier
from modeling.flops import classifier_batch_flops


class ClassifierModule(OptimisedModule):
    """Cross-entropy training of a SequenceClassifier; accuracy, macro F1 and confusion matrix per stage."""

    loss_reads_output_layer = False  # the head reads hidden states

    def __init__(
        self,
        model: PreTrainedModel,
        class_names: list[str],
        hidden: int = 128,
        activation: str = "gelu",
        dropout: float = 0.1,
        extra_token: bool = False,
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        betas: tuple[float, float] = (0.9, 0.999),
        warmup_ratio: float = 0.1,
        metrics_every_n_steps: int = 1,
    ) -> None:
        super().__init__(model, lr, weight_decay, betas, warmup_ratio, metrics_every_n_steps)
        self.class_names = list(class_names)
        self.head_config = {
            "class_names": self.class_names,
            "hidden": hidden,
            "activation": activation,
            "dropout": dropout,
            "extra_token": extra_token,
        }
        self.classifier = SequenceClassifier(
            model, len(class_names), hidden, activation, dropout, extra_token
        )
        self.losses = nn.ModuleDict({f"{stage}_loss": MeanMetric() for stage in ("train", "val", "test")})
        self.scores = nn.ModuleDict(
            {stage: ClassificationMetrics(len(class_names)) for stage in ("val", "test")}
        )

    @classmethod
    def from_config(cls, model: PreTrainedModel, cfg: DictConfig, task: Task) -> ClassifierModule:
        """The module for a train.py config: classes from the task, head from `method.head`,
        `cfg.optim`, `cfg.metrics`."""
        return cls(model, task.class_names, **(cfg.method.get("head") or {}), **module_settings(cfg))

    @property
    def model(self) -> PreTrainedModel:
        """The backbone causal LM."""
        return self.classifier.model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.classifier(input_ids, attention_mask)

    def predict_classes(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Class scores [B, C] of a classification batch."""
        return classifier_head.head_scores(self.classifier, batch)

    def write_extras(self, target: Path) -> None:
        """Save the head beside the model (modeling/classifier_head.py)."""
        classifier_head.save(self.classifier, self.head_config, target)

    def batch_flops(self, batch: dict[str, torch.Tensor], backward: bool) -> int:
        """FLOPs of a batch: the backbone over each text (and the extra token), the head at the pooled
        positions."""
        extra = int(self.classifier.extra_token is not None)  # the trainable token after each text
        lengths = [int(n) + extra for n in batch["prompt_length"]]  # the text, no label target
        head = sum(p.numel() for p in self.classifier.head.parameters() if p.ndim >= 2)
        positions = len(lengths) if self.classifier.keep_one_logit else sum(lengths)
        trains = extra or any(p.requires_grad for p in self.model.parameters())
        return classifier_batch_flops(self.flop_counts, lengths, head, positions, backward, bool(trains))

    def _shared_step(self, batch: dict[str, torch.Tensor], stage: str) -> torch.Tensor:
        self.counted = (batch, stage == "train")  # counted only if flops_per_batch is read
        logits = self.predict_classes(batch)
        loss = nn.functional.cross_entropy(logits.float(), batch["class_index"])
        self.losses[f"{stage}_loss"](loss.detach(), len(logits))
        self.log(
            f"{stage}/loss",
            self.losses[f"{stage}_loss"],
            on_step=stage == "train",
            on_epoch=True,
            prog_bar=True,
        )
        if stage != "train":
            self.scores[stage].update(logits.argmax(-1), batch["class_index"])
        return loss

    def on_validation_epoch_end(self) -> None:
        log_classification_epoch(self, self.scores["val"], "val", self.class_names)

    def on_test_epoch_end(self) -> None:
        log_classification_epoch(self, self.scores["test"], "test", self.class_names)
