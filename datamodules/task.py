"""A task, without Lightning: its records, how each becomes a prompt and a target (few-shot prompts included),
its references, how a prediction is scored, how evaluate.py scores it, the token classes its analyses label,
and its tokenization. Evaluation and analysis take a `Task`; a train.py run's DataModule (datamodules/base.py)
holds one and batches what it tokenizes.

A fine-tuning task subclasses `Task` and implements `format_example(record) -> (prompt, target)`,
`reference` and `score`; a pre-training task overrides `tokenize_all` (packing). Loading, splitting and
tokenization with prompt masking are done here once.
"""

from __future__ import annotations

import functools
import logging
import random
from collections.abc import Callable, Mapping
from types import MappingProxyType
from typing import Any

import numpy as np
import torch
from transformers import PreTrainedTokenizerBase

from datamodules import IGNORE_INDEX, chat, padding_free
from datamodules.chat import ChatStyle, Messages
from datamodules.prompt_format import PromptFormat
from datamodules.sources import DataSourceError, load_split

log = logging.getLogger(__name__)


class Task:
    """One task's (prompt, target) examples, with the loss on the target only, by default."""

    # stop strings evaluate.py adds to generation.stop_strings for this task
    extra_stop_strings: tuple[str, ...] = ()
    # whether its batches can be padding-free (datamodules/padding_free.py): each example is one sequence
    # with its own labels
    allows_padding_free: bool = True
    # whether its prompts can be put in a chat template (`prompt.chat_template`; false: always plain text)
    renders_chat: bool = True
    # the evaluation prompt formats this task can build, by `prompt.style` name
    # (datamodules/prompt_format.py)
    prompt_formats: Mapping[str, type[PromptFormat]] = MappingProxyType({"lmlab": PromptFormat})
    # how evaluate.py scores this task: the scorer of this name (evaluation/scorers/): "generation" (generate,
    # then `score`) or "classification" (each label's likelihood, or the projection head a run saved)
    evaluation_kind: str = "generation"
    # the score (a key of `score`'s result) GRPO rewards by default (objective.reward: null); None: the task
    # has no default reward
    reward_score: str | None = None
    # token classes the attention analysis can label in this task's inputs (attention_input), in tie-break
    # order; the last one is every unlabelled character. Empty: the task labels none (maps only).
    attention_classes: tuple[str, ...] = ()

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        source: Mapping[str, Any],
        splits: Mapping[str, str],
        max_length: int = 512,
        val_size: float = 0.1,
        max_train_samples: int | None = None,
        max_eval_samples: int | None = None,
        seed: int = 0,
        prompt_style: str = "lmlab",
        chat_style: ChatStyle | None = None,
        padding_free: bool = True,
    ) -> None:
        if prompt_style not in self.prompt_formats:
            raise ValueError(
                f"prompt.style={prompt_style}: {type(self).__name__} builds only {list(self.prompt_formats)}"
            )
        # how evaluation prompts are built and generations scored (prompt.style)
        self.prompt_format = self.prompt_formats[prompt_style](self)
        # None: plain-text prompts; else the chat template's system message and exemplar turns
        self.chat_style = chat_style
        self.tokenizer = tokenizer
        self.source, self.splits = source, splits
        self.max_length, self.val_size = max_length, val_size
        self.max_train_samples, self.max_eval_samples = max_train_samples, max_eval_samples
        self.seed = seed
        # data.padding_free asks for padding-free batches; the training run turns them on (`padding_free`)
        # once the task allows them (`allows_padding_free`) and the model keeps packed examples apart
        # (modeling/padding_free.py)
        self.padding_free_requested, self.padding_free = padding_free, False

    def format_example(self, record: Mapping[str, Any]) -> tuple[str, str]:
        """Return (prompt, target) text for one validated record."""
        raise NotImplementedError

    def reference(self, record: Mapping[str, Any]) -> str:
        """The gold answer that generated text is scored against."""
        raise NotImplementedError

    def score(self, generation: str, reference: str) -> dict[str, Any]:
        """Extracted answers and 0/1 `exact_match_*` scores of one generation."""
        raise NotImplementedError

    def corpus_metrics(self, generations: list[str], references: list[str]) -> dict[str, float]:
        """Metrics over the whole evaluation set (e.g. corpus BLEU); none by default."""
        return {}

    def corpus_statistics(
        self, generations: list[str], references: list[Any]
    ) -> dict[str, Callable[[np.ndarray], float]]:
        """Each corpus metric as a function of item indices, for its bootstrap interval: by default
        `corpus_metrics` recomputed on those items (once per resample for all of them); a task whose metrics
        decompose over items returns faster equivalents."""

        @functools.cache
        def on(picked: bytes) -> dict[str, float]:
            indices = np.frombuffer(picked, dtype=np.int64)
            return self.corpus_metrics([generations[i] for i in indices], [references[i] for i in indices])

        return {
            name: lambda indices, name=name: on(np.asarray(indices, dtype=np.int64).tobytes())[name]
            for name in self.corpus_metrics(generations, references)
        }

    def evaluation_records(self) -> list[dict[str, Any]]:
        """The examples evaluate.py generates for: the test records, by default."""
        return self.records("test")

    def limited(self, records: list[dict[str, Any]], limit: int | None) -> list[dict[str, Any]]:
        """The evaluation records `limit` (evaluate.py's) keeps: the first `limit`."""
        return records[:limit]

    def attention_input(self, record: Mapping[str, Any]) -> tuple[str, list[tuple[int, int, str]]]:
        """The text the model reads for `record` (its zero-shot evaluation prompt) and the (start, end, class)
        character spans of its parts labelled with `attention_classes` (none by default)."""
        return self.prompt_format.prompt(record, []), []

    def clean_input(self, record: Mapping[str, Any]) -> tuple[str, list[tuple[int, int, str]]]:
        """`attention_input` of the record without the noise the task injects (a noisy task's clean
        counterpart, which activation patching patches from); a task without noise has none."""
        raise NotImplementedError(
            f"{type(self).__name__} injects no noise: its prompts have no clean counterpart"
        )

    def records(self, stage: str) -> list[dict[str, Any]]:
        """Raw records of `stage` (train / val / test), split and subsampled; test falls back to val."""
        if stage == "test" and "test" in self.splits:
            return load_split(self.source, self.splits["test"], "test")[: self.max_eval_samples]
        train = load_split(self.source, self.splits["train"], "train")
        if "val" in self.splits:
            val = load_split(self.source, self.splits["val"], "val")
        else:
            count = max(1, int(self.val_size * len(train))) if self.val_size < 1 else int(self.val_size)
            if not 0 < count < len(train):
                raise ValueError(
                    f"data.val_size={self.val_size} leaves no train or no validation examples "
                    f"out of {len(train)} train records; use a fraction in (0, 1) or a smaller count"
                )
            shuffled = random.Random(self.seed).sample(train, len(train))
            val, train = shuffled[:count], shuffled[count:]
        return train[: self.max_train_samples] if stage == "train" else val[: self.max_eval_samples]

    def tokenize_all(self, records: list[dict[str, Any]], split: str) -> list[dict[str, Any]]:
        """Tokenize records, dropping (and counting) those truncated to no target tokens."""
        examples = [self.tokenize_record(record) for record in records]
        kept = [example for example in examples if any(label != IGNORE_INDEX for label in example["labels"])]
        if examples and not kept:
            raise DataSourceError(
                f"{split}: data.max_length={self.max_length} cuts off the target of all "
                f"{len(examples)} examples (the prompt alone fills it, e.g. "
                f"{records[0].get('_where', 'the first record')}): raise data.max_length"
            )
        if len(kept) < len(examples):
            log.warning(
                "%s: dropped %d of %d examples whose target was cut off by data.max_length=%d",
                split,
                len(examples) - len(kept),
                len(examples),
                self.max_length,
            )
        return kept

    def tokenize_record(self, record: Mapping[str, Any]) -> dict[str, list[int]]:
        """Token ids and labels of one record: its (prompt, target) pair by default."""
        return self.tokenize(*self.format_example(record))

    def render(self, messages: Messages, add_generation_prompt: bool = False) -> str:
        """`messages` in the tokenizer's chat template (`chat.render`)."""
        return chat.render(self.tokenizer, messages, add_generation_prompt)

    def chat_pair(self, prompt: str, target: str) -> tuple[str, str]:
        """A (prompt, target) example in the chat template: the system message and the prompt as the user turn
        with the generation prompt, and the text the target's assistant turn adds after it."""
        messages = chat.conversation(self.chat_style, [], prompt)
        before = self.render(messages, add_generation_prompt=True)
        turn = {"role": "assistant", "content": target.strip()}
        return before, chat.segments(self.render, [*messages, turn])[1][0]

    def chat_prompt(self, text: str) -> tuple[str, int]:
        """The prompt the model reads for the plain prompt `text` (rendered in the chat template where prompts
        are) and where `text` starts in it."""
        if self.chat_style is None:
            return text, 0
        rendered = self.chat_pair(text, "")[0]
        return rendered, rendered.rindex(text)

    def tokenize(self, prompt: str, target: str) -> dict[str, list[int]]:
        """Token ids of prompt + target + EOS (in the chat template: the prompt's turns + the assistant turn),
        with labels masked to IGNORE_INDEX on the prompt."""
        eos = [self.tokenizer.eos_token_id]
        if self.chat_style is not None:
            (prompt, target), eos = self.chat_pair(prompt, target), []
        prompt_ids = self.tokenizer(prompt)["input_ids"]
        target_ids = self.tokenizer(target, add_special_tokens=False)["input_ids"] + eos
        input_ids = (prompt_ids + target_ids)[: self.max_length]
        labels = ([IGNORE_INDEX] * len(prompt_ids) + target_ids)[: self.max_length]
        return {"input_ids": input_ids, "labels": labels}

    def tokenize_conversation(self, messages: Messages, last_turn_only: bool = False) -> dict[str, list[int]]:
        """Token ids of a rendered conversation with labels on its assistant turns only (the last one only,
        with `last_turn_only`)."""
        input_ids: list[int] = []
        labels: list[int] = []
        pieces = chat.segments(self.render, messages)
        last = max(number for number, (_, supervised) in enumerate(pieces) if supervised)
        for number, (text, supervised) in enumerate(pieces):
            supervised = supervised and (number == last or not last_turn_only)
            ids = self.tokenizer(text, add_special_tokens=number == 0)["input_ids"] if text else []
            input_ids += ids
            labels += ids if supervised else [IGNORE_INDEX] * len(ids)
        return {"input_ids": input_ids[: self.max_length], "labels": labels[: self.max_length]}

    def collate(self, examples: list[dict[str, list[int]]]) -> dict[str, torch.Tensor]:
        """Padding-free, one row of the examples (`padding_free`: datamodules/padding_free.py), else
        right-padded to the longest example: input_ids, attention_mask, labels, each [B, T]."""
        if self.padding_free:
            return padding_free.one_row(examples)
        width = max(len(example["input_ids"]) for example in examples)
        pad = self.tokenizer.pad_token_id

        def padded(key: str, value: int) -> torch.Tensor:
            return torch.tensor(
                [example[key] + [value] * (width - len(example[key])) for example in examples]
            )

        input_ids = padded("input_ids", pad)
        mask = torch.tensor(
            [[1] * len(e["input_ids"]) + [0] * (width - len(e["input_ids"])) for e in examples]
        )
        return {"input_ids": input_ids, "attention_mask": mask, "labels": padded("labels", IGNORE_INDEX)}
