"""A researcher's own prompt/response data, no code (`task=prompt_response`): any JSONL / JSON / CSV / Parquet
file or hub dataset whose columns are mapped in config: a prompt and a response column (and an optional
per-record system column), or a chat `messages` column (a list of {role, content}, the last assistant turn
being the response).

Training puts the loss on the response only. Evaluation generates a response for each test record and scores
it by `task.metric`: `exact_match` (the answer `task.answer_pattern` extracts from the generation and from the
reference, else the whole stripped text, compared case-insensitively where `task.ignore_case`), or `rouge_l` /
`bleu` (text_metrics.py); an LLM judge (`judge=...`) scores it too where one is configured.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from types import MappingProxyType
from typing import Any

from datamodules.chat import Messages
from datamodules.prompt_format import PromptFormat
from datamodules.sources import DataSourceError
from datamodules.task import Task
from datamodules.text_metrics import sentence_scores

METRICS = ("exact_match", "rouge_l", "bleu")
ROLES = ("system", "user", "assistant")


class PromptResponseFormat(PromptFormat):
    """Prompts of a prompt/response task: the plain prompt (exemplars before it), or in the chat template the
    record's own conversation with each exemplar as a user and an assistant turn before its last turn."""

    def prompt(self, record: Mapping[str, Any], exemplars: list[Mapping[str, Any]]) -> str:
        if self.task.chat_style is None:
            return super().prompt(record, exemplars)
        return self.task.render(self.task.conversation(record, exemplars), add_generation_prompt=True)


class PromptResponseTask(Task):
    """Records mapped by `columns` ({prompt, response, system, messages}: column names, null where unused)."""

    prompt_formats = MappingProxyType({"lmlab": PromptResponseFormat})

    def __init__(
        self,
        columns: Mapping[str, str | None],
        metric: str = "exact_match",
        answer_pattern: str | None = None,
        ignore_case: bool = True,
        separator: str = "\n",
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if metric not in METRICS:
            raise ValueError(f"task.metric={metric!r}: one of {', '.join(METRICS)}")
        if not columns.get("messages") and not (columns.get("prompt") and columns.get("response")):
            raise ValueError(
                "task.columns: map `messages` (a chat column) or both `prompt` and `response` to your columns"
            )
        self.columns, self.metric, self.separator = dict(columns), metric, separator
        self.answer = re.compile(answer_pattern) if answer_pattern else None
        self.ignore_case = ignore_case

    def records(self, stage: str) -> list[dict[str, Any]]:
        """The split's records, each checked against the column mapping (the file, line and column named)."""
        records = super().records(stage)
        for record in records:
            self.turns(record)
        return records

    def turns(self, record: Mapping[str, Any]) -> tuple[str | None, Messages, str]:
        """(system message, the turns before the response, the response) of a record."""
        where, columns = record.get("_where", "?"), self.columns

        def text(key: str, required: bool = True) -> str | None:
            column = columns.get(key)
            if column is None:
                return None
            if column not in record:
                present = sorted(k for k in record if k != "_where")
                raise DataSourceError(
                    f"{where}: no column '{column}' (task.columns.{key}); columns: {present}"
                )
            value = record[column]
            if value is None and not required:
                return None
            if not isinstance(value, str) or (required and not value.strip()):
                raise DataSourceError(f"{where}: column '{column}' (task.columns.{key}) is empty or not text")
            return value

        system = text("system", required=False)
        if not columns.get("messages"):
            return system, [{"role": "user", "content": text("prompt")}], text("response")
        messages = record.get(columns["messages"])
        if not isinstance(messages, list) or not all(
            isinstance(m, Mapping) and m.get("role") in ROLES and isinstance(m.get("content"), str)
            for m in messages
        ):
            raise DataSourceError(
                f"{where}: column '{columns['messages']}' (task.columns.messages) must be a list of "
                f"{{role: {'|'.join(ROLES)}, content: text}}"
            )
        if not messages or messages[-1]["role"] != "assistant" or not messages[-1]["content"].strip():
            raise DataSourceError(
                f"{where}: column '{columns['messages']}' (task.columns.messages) must end in a non-empty "
                "assistant turn (the response)"
            )
        turns = [dict(m) for m in messages[:-1]]
        if turns and turns[0]["role"] == "system":
            system = system or turns.pop(0)["content"]
        return system, turns, messages[-1]["content"]

    def conversation(self, record: Mapping[str, Any], exemplars: list[Mapping[str, Any]]) -> Messages:
        """The messages before a record's response: its system message (else `prompt.system`), each
        exemplar as a user and an assistant turn, then the record's turns."""
        system, turns, _ = self.turns(record)
        system = system or (self.chat_style.system if self.chat_style else None)
        shots = []
        for exemplar in exemplars:
            _, before, response = self.turns(exemplar)
            shots += [*before, {"role": "assistant", "content": response}]
        return ([{"role": "system", "content": system}] if system else []) + shots + turns

    def format_example(self, record: Mapping[str, Any]) -> tuple[str, str]:
        """(plain prompt, response): the system text, the earlier turns as `role: text` lines, the last user
        turn, then `task.separator`."""
        system, turns, response = self.turns(record)
        history = [f"{m['role']}: {m['content']}" for m in turns[:-1]]
        last = turns[-1]["content"] if turns else ""
        prompt = "\n".join([*([system] if system else []), *history, last])
        return prompt + self.separator, response

    def tokenize_record(self, record: Mapping[str, Any]) -> dict[str, list[int]]:
        """Token ids with labels on the response only (in the chat template: its assistant turn)."""
        if self.chat_style is None:
            return self.tokenize(*self.format_example(record))
        response = {"role": "assistant", "content": self.turns(record)[2]}
        return self.tokenize_conversation([*self.conversation(record, []), response], last_turn_only=True)

    def reference(self, record: Mapping[str, Any]) -> str:
        return self.turns(record)[2]

    def extracted(self, text: str) -> str:
        """The answer `task.answer_pattern` finds last in `text` (its first group, else the match), else the
        whole text; stripped, and lower-cased where `task.ignore_case`."""
        matches = list(self.answer.finditer(text)) if self.answer else []
        if matches:
            text = matches[-1].group(1) if matches[-1].groups() else matches[-1].group(0)
        text = text.strip()
        return text.casefold() if self.ignore_case else text

    def score(self, generation: str, reference: str) -> dict[str, Any]:
        """`exact_match_answer` (with `extracted_answer`), or sentence ROUGE-L / BLEU, by `task.metric`."""
        if self.metric == "exact_match":
            answer = self.extracted(generation)
            return {
                "extracted_answer": answer,
                "exact_match_answer": float(answer == self.extracted(reference)),
            }
        return {self.metric: sentence_scores(generation, reference)[self.metric]}
