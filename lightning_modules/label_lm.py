"""Generative classification: train the causal LM on " <label>", predict by full-label log-likelihood.

The prediction for a text is the class whose whole label string (all its tokens, then EOS) has the
highest summed log-probability after the prompt, so multi-token labels that share a first token are
still told apart. Validation and test add accuracy (micro), macro F1 and a confusion-matrix image
(lightning_modules/classifier.py) to the causal-LM metrics.
"""

from __future__ import annotations

from typing import Any

import torch
from omegaconf import DictConfig
from transformers import PreTrainedModel

from datamodules.task import Task
from lightning_modules.base import module_settings
from lightning_modules.causal_lm import CausalLMModule
from lightning_modules.classification_metrics import ClassificationMetrics, log_classification_epoch
from modeling.classifier_head import label_scores


class LabelLMModule(CausalLMModule):
    """CausalLMModule whose validation / test also classify by label likelihood."""

    def __init__(
        self,
        model: PreTrainedModel,
        label_token_ids: list[list[int]],
        class_names: list[str],
        pad_token_id: int,
        **optim: Any,
    ) -> None:
        super().__init__(model, **optim)
        self.label_token_ids, self.class_names, self.pad_token_id = (
            label_token_ids,
            list(class_names),
            pad_token_id,
        )
        self.scores = torch.nn.ModuleDict(
            {stage: ClassificationMetrics(len(class_names)) for stage in ("val", "test")}
        )

    @classmethod
    def from_config(cls, model: PreTrainedModel, cfg: DictConfig, task: Task) -> LabelLMModule:
        """The module for a train.py config: label tokens and class names from the classification task."""
        return cls(
            model,
            task.label_token_ids(),
            task.class_names,
            task.tokenizer.pad_token_id,
            **module_settings(cfg),
            **cfg.moe,
        )

    def predict_classes(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Label log-likelihoods [B, C] of a classification batch."""
        return label_scores(self.model, batch, self.label_token_ids, self.pad_token_id)

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        super().validation_step(batch, batch_idx)
        self.scores["val"].update(self.predict_classes(batch).argmax(-1), batch["class_index"])

    def test_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        super().test_step(batch, batch_idx)
        self.scores["test"].update(self.predict_classes(batch).argmax(-1), batch["class_index"])

    def on_validation_epoch_end(self) -> None:
        super().on_validation_epoch_end()
        log_classification_epoch(self, self.scores["val"], "val", self.class_names)

    def on_test_epoch_end(self) -> None:
        super().on_test_epoch_end()
        log_classification_epoch(self, self.scores["test"], "test", self.class_names)
