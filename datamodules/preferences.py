"""Preference pairs for DPO (objective=dpo): records with a prompt, a chosen and a rejected response, the
columns mapped in config (`task.columns`), from any local file or hub dataset. Under objective=sft the same
task trains on the chosen responses (the usual SFT-then-DPO baseline)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from datamodules import IGNORE_INDEX
from datamodules.sources import DataSourceError
from datamodules.task import Task

PAIR_KEYS = ("prompt", "chosen", "rejected")


def pair_text(record: Mapping[str, Any], columns: Mapping[str, str]) -> tuple[str, str, str]:
    """(prompt, chosen, rejected) of a record; DataSourceError naming the file and line, the column and its
    `task.columns` key where one is missing or not text."""
    values = []
    for key in PAIR_KEYS:
        column = columns[key]
        value = record.get(column)
        if not isinstance(value, str) or not value.strip():
            present = sorted(k for k in record if k != "_where")
            raise DataSourceError(
                f"{record.get('_where', '?')}: column '{column}' (task.columns.{key}) is missing, empty or "
                f"not text; columns: {present}"
            )
        values.append(value)
    return values[0], values[1], values[2]


class PreferenceTask(Task):
    """(prompt, chosen, rejected) records; the loss on the response tokens."""

    def __init__(self, columns: Mapping[str, str], **kwargs: Any) -> None:
        super().__init__(**kwargs)
        missing = [key for key in PAIR_KEYS if not columns.get(key)]
        if missing:
            raise ValueError(f"task.columns.{missing[0]}: map it to the column that holds the {missing[0]}")
        self.columns = dict(columns)

    def records(self, stage: str) -> list[dict[str, Any]]:
        """The split's records, each checked against the column mapping."""
        records = super().records(stage)
        for record in records:
            pair_text(record, self.columns)
        return records

    def format_example(self, record: Mapping[str, Any]) -> tuple[str, str]:
        prompt, chosen, _ = pair_text(record, self.columns)
        return prompt, chosen

    def reference(self, record: Mapping[str, Any]) -> str:
        return pair_text(record, self.columns)[1]

    def tokenize_pairs(self, records: list[dict[str, Any]], split: str) -> list[dict[str, Any]]:
        """Each record as {chosen, rejected: token ids and labels of prompt + response, index}; refused where
        data.max_length leaves a response no token."""
        pairs = []
        for index, record in enumerate(records):
            prompt, chosen, rejected = pair_text(record, self.columns)
            pair = {"chosen": self.tokenize(prompt, chosen), "rejected": self.tokenize(prompt, rejected)}
            if any(set(pair[side]["labels"]) == {IGNORE_INDEX} for side in ("chosen", "rejected")):
                raise DataSourceError(
                    f"{split}: {record.get('_where', '?')}: data.max_length={self.max_length} cuts off a "
                    "response entirely: raise data.max_length"
                )
            pairs.append({**pair, "index": index})
        return pairs
