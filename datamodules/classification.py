"""Text classification (AG News, BBC News or any local CSV/JSONL with a text and a label column).

One tokenized form serves both modes: prompt = the template with the text and the list of labels,
target = " <label name>" + EOS. Generative mode (`label_lm`) trains on the target and predicts by the
log-likelihood of each full label string; head mode (`classifier`) reads only the prompt tokens
(`prompt_length`) and the class index. Labels in the data may be names or integer ids into `class_names`.
"""

from __future__ import annotations

import string
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from datamodules import IGNORE_INDEX
from datamodules.sources import DataSourceError
from datamodules.task import Task


class ClassificationTask(Task):
    """(text, label) records as prompt -> label-name examples, with the class index in every batch."""

    # the label scorer reads a padded batch (prompt_length per row)
    allows_padding_free = False

    evaluation_kind = (
        "classification"  # evaluate.py scores label likelihoods (or the saved head), not generations
    )

    def __init__(
        self,
        prompt_template: str,
        class_names: Sequence[str],
        text_column: str = "text",
        label_column: str = "label",
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if not class_names or len(set(class_names)) != len(class_names):
            raise ValueError(f"task.class_names must list distinct class names, got {class_names}")
        self.prompt_template = prompt_template
        self.class_names = [str(name) for name in class_names]
        self.text_column, self.label_column = text_column, label_column

    def class_index(self, record: Mapping[str, Any]) -> int:
        """The record's class as an index into `class_names` (the label may be a name or an integer id)."""
        where = record.get("_where", "?")
        if not isinstance(record.get(self.text_column), str):
            raise DataSourceError(
                f"{where}: no text in column task.text_column='{self.text_column}' "
                f"(fields present: {sorted(k for k in record if k != '_where')})"
            )
        label = record.get(self.label_column)
        if isinstance(label, str) and label.strip().lstrip("-").isdigit():
            label = int(label)
        if isinstance(label, int) and 0 <= label < len(self.class_names):
            return label
        if isinstance(label, str) and label in self.class_names:
            return self.class_names.index(label)
        raise DataSourceError(
            f"{where}: label {label!r} in column task.label_column='{self.label_column}' "
            f"is not one of task.class_names {self.class_names} (or an index into them)"
        )

    def format_example(self, record: Mapping[str, Any]) -> tuple[str, str]:
        index = self.class_index(record)
        prompt = self.prompt_template.format(
            text=record[self.text_column].strip(), labels=", ".join(self.class_names)
        )
        return prompt, " " + self.class_names[index]

    attention_classes = ("LABEL", "TEXT", "OTHER")

    def attention_input(self, record: Mapping[str, Any]) -> tuple[str, list[tuple[int, int, str]]]:
        """The classification prompt (as format_example builds it, in the chat template where prompts are):
        the text is TEXT, each class name in the list of labels is LABEL, the template around them OTHER."""
        prompt, spans = "", []
        for literal, field, _, _ in string.Formatter().parse(self.prompt_template):
            prompt += literal
            if field == "text":
                value = record[self.text_column].strip()
                spans.append((len(prompt), len(prompt) + len(value), "TEXT"))
                prompt += value
            elif field == "labels":
                for number, name in enumerate(self.class_names):
                    prompt += ", " if number else ""
                    spans.append((len(prompt), len(prompt) + len(name), "LABEL"))
                    prompt += name
        rendered, offset = self.chat_prompt(prompt)
        return rendered, [(start + offset, end + offset, label) for start, end, label in spans]

    def label_token_ids(self) -> list[list[int]]:
        """Token ids of each full label string as the target tokenizes it: " <name>" + EOS (in the chat
        template: the assistant turn of the name, its end-of-turn included)."""
        if self.chat_style is not None:
            return [
                self.tokenizer(self.chat_pair("", name)[1], add_special_tokens=False)["input_ids"]
                for name in self.class_names
            ]
        return [
            self.tokenizer(" " + name, add_special_tokens=False)["input_ids"] + [self.tokenizer.eos_token_id]
            for name in self.class_names
        ]

    def tokenize_all(self, records: list[dict[str, Any]], split: str) -> list[dict[str, Any]]:
        examples = []
        for record in records:
            example = self.tokenize(*self.format_example(record))
            labels = example["labels"]
            prompt_length = next((i for i, label in enumerate(labels) if label != IGNORE_INDEX), len(labels))
            if prompt_length == len(labels):
                raise DataSourceError(
                    f"{record.get('_where', '?')}: the prompt fills data.max_length={self.max_length}; "
                    "raise data.max_length or shorten the text"
                )
            examples.append(
                {**example, "class_index": self.class_index(record), "prompt_length": prompt_length}
            )
        return examples

    def collate(self, examples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        """The base batch plus `class_index` [B] and `prompt_length` [B] (tokens before the label)."""
        batch = super().collate(examples)
        batch["class_index"] = torch.tensor([e["class_index"] for e in examples])
        batch["prompt_length"] = torch.tensor([e["prompt_length"] for e in examples])
        return batch

    def reference(self, record: Mapping[str, Any]) -> str:
        return self.class_names[self.class_index(record)]

    reward_score = "exact_match"

    def score(self, generation: str, reference: str) -> dict[str, Any]:
        """The generated label (the first line, stripped) and its 0/1 `exact_match` with the reference: what
        GRPO rewards (evaluation scores labels by likelihood instead)."""
        predicted = next(iter(generation.strip().splitlines()), "").strip()
        return {"predicted": predicted, "exact_match": float(predicted == reference)}
