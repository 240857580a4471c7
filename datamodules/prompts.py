"""The DataModules of learning from rewards and preferences (objective=grpo|dpo): a task's prompts with their
references, batched as prompts for GRPO to sample from; and a preference task's (prompt, chosen, rejected)
triples, tokenized as pairs for DPO."""

from __future__ import annotations

from typing import Any

import torch

from datamodules.base import TextDataModule
from datamodules.task import Task


class PromptDataModule(TextDataModule):
    """Batches of a task's zero-shot evaluation prompts (its `prompt.style`, in the chat template where
    prompts are) and references: `batch_size` completions per training step are `batch_size / num_generations`
    prompts, each batch repeated `num_iterations` times in a row; evaluation batches `eval_batch_size`
    prompts."""

    def __init__(self, task: Task, num_generations: int, num_iterations: int = 1, **batching: Any) -> None:
        super().__init__(task, **batching)
        self.batch_size = self.batch_size // num_generations  # prompts per step
        self.batch_repeats = num_iterations

    def examples(self, split: str) -> list[dict[str, Any]]:
        """The prompts of `split`, their token ids and references."""
        prompts = self.task.prompt_format
        return [
            {
                "prompt": (text := prompts.prompt(record, [])),
                "prompt_ids": self.task.tokenizer(text)["input_ids"],
                "reference": prompts.reference(record),
            }
            for record in self.task.records(split)
        ]

    def collate(self, examples: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """The prompts as they are: GRPO samples completions for them and builds its own batch."""
        return examples


class PairDataModule(TextDataModule):
    """Batches of preference pairs: each example tokenized twice, prompt + chosen and prompt + rejected
    (labels on the response), collated as one right-padded batch [2B, T] of the B chosen then the B
    rejected, with each pair's `index` [B] (its cached reference log-probs)."""

    def examples(self, split: str) -> list[dict[str, Any]]:
        """The preference pairs of `split`, each tokenized as prompt + chosen and prompt + rejected."""
        return self.task.tokenize_pairs(self.task.records(split), split)

    def collate(self, examples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        rows = [e["chosen"] for e in examples] + [e["rejected"] for e in examples]
        batch = self.task.collate(rows)
        batch["index"] = torch.tensor([e["index"] for e in examples])
        return batch
