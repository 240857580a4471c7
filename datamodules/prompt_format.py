"""Evaluation prompt formats: how a task's evaluation prompts are built and its generations scored, one object
per `prompt.style`, chosen once when the task is built (`Task.prompt_format`).

`PromptFormat` is lmlab's own style for any task; a style that reproduces another harness subclasses it
(lm_eval_format.LmEvalGSM8KFormat) and the task lists it in its `prompt_formats`.
"""

from __future__ import annotations

import random
from collections.abc import Mapping
from typing import Any, Protocol

from datamodules import chat


class FormattedTask(Protocol):
    """What a prompt format asks of its task (datamodules/task.py): this module depends on this much only."""

    extra_stop_strings: tuple[str, ...]
    chat_style: Any

    def render(self, messages: list[dict[str, str]], add_generation_prompt: bool = False) -> str: ...

    def records(self, stage: str) -> list[dict[str, Any]]: ...

    def format_example(self, record: Mapping[str, Any]) -> tuple[str, str]: ...

    def reference(self, record: Mapping[str, Any]) -> Any: ...

    def score(self, generation: str, reference: Any) -> dict[str, Any]: ...


class PromptFormat:
    """lmlab's style: k-shot prompts from the task's (prompt, target) pairs, one seeded exemplar draw shared
    by every problem, the configured stop strings plus the task's, and the task's own reference and score."""

    # between an exemplar's prompt and its target in a plain-text prompt (lmlab's prompts end in a newline)
    target_delimiter = ""

    def __init__(self, task: FormattedTask) -> None:
        self.task = task

    def fewshot_exemplars(
        self, records: list[dict[str, Any]], count: int, seed: int
    ) -> list[list[dict[str, Any]]]:
        """The exemplars of each record's k-shot prompt: one seeded draw from the train split, shared by
        all."""
        shared = random.Random(seed).sample(self.task.records("train"), count) if count else []
        return [shared for _ in records]

    def example(self, record: Mapping[str, Any]) -> tuple[str, str]:
        """An exemplar's (prompt, target)."""
        return self.task.format_example(record)

    def question(self, record: Mapping[str, Any]) -> str:
        """The prompt of the record a completion is asked for."""
        return self.task.format_example(record)[0]

    def prompt(self, record: Mapping[str, Any], exemplars: list[Mapping[str, Any]]) -> str:
        """k-shot prompt: each exemplar's prompt and target and a blank line, then the record's prompt; in the
        task's chat style, the conversation of those (datamodules/chat.py) with the generation prompt."""
        shots, question = [self.example(e) for e in exemplars], self.question(record)
        if self.task.chat_style is None:
            return "".join(p + self.target_delimiter + t + "\n\n" for p, t in shots) + question
        messages = chat.conversation(self.task.chat_style, shots, question, self.target_delimiter)
        return self.task.render(messages, add_generation_prompt=True)

    def stop_strings(self, configured: list[str]) -> list[str]:
        """The stop strings of the generations: `generation.stop_strings` plus the task's
        `extra_stop_strings`."""
        return [*configured, *self.task.extra_stop_strings]

    def reference(self, record: Mapping[str, Any]) -> Any:
        """The gold answer that a generation for `record` is scored against."""
        return self.task.reference(record)

    def score(self, generation: str, reference: Any) -> dict[str, Any]:
        """Extracted answers and 0/1 `exact_match_*` scores (or other per-generation metrics) of one
        generation."""
        return self.task.score(generation, reference)
