"""Generative classification: train the causal LM on " <label>", predict by full-label log-likelihood.

The prediction for a text is the class whose whole label string (all its tokens, then EOS) has the
highest summed log-probability after the prompt, so multi-token labels that share a first token are
still told apart. Validation and test add accuracy (micro), macro F1 and a confusion-matrix image
(modeling/classifier.py) to the causal-LM metrics.
"""

from __future__ import annotations

from typing import Any

import torch
from omegaconf import DictConfig
from transformers import PreTrainedModel

from datamodules.base import IGNORE_INDEX
from modeling.base_module import module_settings
from modeling.causal_lm import CausalLMModule, answer_log_probs
from modeling.classifier import ClassificationMetrics, log_classification_epoch


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
    def from_config(cls, model: PreTrainedModel, cfg: DictConfig, datamodule: Any) -> LabelLMModule:
        """The module for a train.py config: label tokens and class names from the classification
        DataModule."""
        return cls(
            model,
            datamodule.label_token_ids(),
            datamodule.class_names,
            datamodule.tokenizer.pad_token_id,
            **module_settings(cfg),
        )

    def predict_classes(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Label log-likelihoods [B, C] of a classification batch."""
        prompts = [
            ids[:length].tolist()
            for ids, length in zip(batch["input_ids"], batch["prompt_length"], strict=True)
        ]
        return label_logprobs(self.model, prompts, self.label_token_ids, self.pad_token_id)

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
