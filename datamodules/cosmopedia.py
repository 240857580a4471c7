"""Pre-training text (cosmopedia-v2 or any local text): documents -> tokens -> fixed-length blocks.

Documents are tokenized, joined with EOS between them into one stream, and cut into blocks of
`max_length` tokens; every block is full, blocks do not overlap, and only the final remainder
(< max_length tokens) is dropped. Labels are the inputs (the model shifts them); attention is not
masked at document boundaries (the usual way to pre-train on concatenated text). Validation blocks come
from held-out documents.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from datamodules.sources import DataSourceError
from datamodules.task import Task


def concatenate_into_blocks(documents: list[list[int]], block_size: int, separator: int) -> list[list[int]]:
    """Concatenate token lists with `separator` after each and cut into full blocks of `block_size`."""
    stream = [token for document in documents for token in (*document, separator)]
    return [stream[i : i + block_size] for i in range(0, len(stream) - block_size + 1, block_size)]


class PretrainTask(Task):
    """Next-token prediction in fixed-length blocks over documents whose text is in `text_fields`."""

    # its blocks are full already: no padding to remove
    allows_padding_free = False
    # documents are read as they are, never as a conversation
    renders_chat = False

    def __init__(self, text_fields: Sequence[str] = ("text",), **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.text_fields = list(text_fields)

    def document(self, record: Mapping[str, Any]) -> str:
        """The text of one record: its `text_fields` joined by newlines."""
        missing = [f for f in self.text_fields if not isinstance(record.get(f), str)]
        if missing:
            raise DataSourceError(
                f"{record.get('_where', '?')}: record has no text field(s) {missing} (task.text_fields="
                f"{self.text_fields}; fields present: {sorted(k for k in record if k != '_where')})"
            )
        return "\n".join(record[f] for f in self.text_fields)

    def tokenize_all(self, records: list[dict[str, Any]], split: str) -> list[dict[str, list[int]]]:
        documents = [self.tokenizer(self.document(r), add_special_tokens=False)["input_ids"] for r in records]
        blocks = concatenate_into_blocks(documents, self.max_length, self.tokenizer.eos_token_id)
        if not blocks:
            raise DataSourceError(
                f"{split}: {len(records)} documents give fewer than data.max_length={self.max_length} "
                "tokens; add documents (task.max_documents) or lower data.max_length"
            )
        return [{"input_ids": block, "labels": block} for block in blocks]
