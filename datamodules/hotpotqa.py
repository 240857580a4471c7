"""HotpotQA (distractor setting) turned into knowledge pieces: 2-hop chains of cloze prompts.

For a bridge question with supporting paragraphs A and B, where A's supporting sentence mentions B's
title (the bridge entity): hop 1 = the prefix of A's sentence before the bridge entity -> the bridge
entity; hop 2 = the prefix of B's sentence before the final answer -> the answer. The subject of a
piece is its paragraph title when the prompt contains it (MEMIT edits at its last token). Both the
original JSON format and the hub's (`hotpotqa/hotpot_qa`, dict-of-lists fields) are read. Questions
whose answer or bridge entity does not appear in a supporting sentence (comparison, yes/no) give no pieces.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from datamodules import IGNORE_INDEX
from datamodules.sources import DataSourceError
from datamodules.task import Task


def _paragraphs(record: Mapping[str, Any]) -> tuple[dict[str, list[str]], list[tuple[str, int]]]:
    where = record.get("_where", "a record")
    for key in ("context", "supporting_facts", "answer"):
        if key not in record:
            raise DataSourceError(
                f"{where}: HotpotQA record without '{key}' (needs context, supporting_facts, answer)"
            )
    context, facts = record["context"], record["supporting_facts"]
    try:
        if isinstance(context, Mapping):  # hub format
            paragraphs = dict(zip(context["title"], context["sentences"], strict=True))
            supporting = list(zip(facts["title"], facts["sent_id"], strict=True))
        else:
            paragraphs = {title: sentences for title, sentences in context}
            supporting = [(title, int(sentence)) for title, sentence in facts]
    except (KeyError, TypeError, ValueError) as error:
        raise DataSourceError(
            f"{where}: malformed HotpotQA context/supporting_facts ({type(error).__name__}: {error}); "
            "expected "
            "context [[title, [sentences]], ...] and supporting_facts [[title, sentence index], ...] (or the "
            "hub's columns)"
        ) from error
    return paragraphs, supporting


def _entity(title: str) -> str:
    return re.sub(r"\s*\([^)]*\)$", "", title).strip()


def _cloze(sentence: str, answer: str) -> str | None:
    index = sentence.find(answer)
    prompt = sentence[:index].strip() if index > 0 else ""
    return prompt if len(prompt.split()) >= 3 else None


def knowledge_pieces(record: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The hop-1 and hop-2 cloze pieces of a bridge question (empty when no clean chain exists)."""
    paragraphs, supporting = _paragraphs(record)
    sentences = {}
    for title, index in supporting:
        if title in paragraphs and 0 <= index < len(paragraphs[title]):
            sentences.setdefault(title, paragraphs[title][index].strip())
    titles = list(sentences)
    for first, second in ((a, b) for a in titles for b in titles if a != b):
        bridge, answer = _entity(second), record["answer"].strip()
        hop1, hop2 = _cloze(sentences[first], bridge), _cloze(sentences[second], answer)
        if hop1 and hop2:
            chain = record["_id"] if "_id" in record else record["id"]
            return [
                {
                    "id": f"{chain}/1",
                    "chain": chain,
                    "hop": 1,
                    "prompt": hop1,
                    "answer": bridge,
                    "subject": _entity(first) if _entity(first) in hop1 else None,
                },
                {
                    "id": f"{chain}/2",
                    "chain": chain,
                    "hop": 2,
                    "prompt": hop2,
                    "answer": answer,
                    "subject": bridge if bridge in hop2 else None,
                },
            ]
    return []


class HotpotQATask(Task):
    """Knowledge pieces of HotpotQA as (cloze prompt, " answer") examples; the loss covers the answer."""

    # cloze pieces stay plain text, as ROME/MEMIT score facts
    renders_chat = False

    def records(self, stage: str) -> list[dict[str, Any]]:
        pieces = []
        for record in super().records(stage):
            pieces += [{**piece, "_where": record.get("_where")} for piece in knowledge_pieces(record)]
        return pieces

    def format_example(self, record: Mapping[str, Any]) -> tuple[str, str]:
        return record["prompt"], " " + record["answer"]

    def answer_example(self, prompt: str, answer: str) -> dict[str, list[int]]:
        """prompt + " answer" tokens with labels on the answer only and no EOS: what log P(answer | prompt)
        scores."""
        prompt_ids = self.tokenizer(prompt)["input_ids"]
        answer_ids = self.tokenizer(" " + answer, add_special_tokens=False)["input_ids"]
        return {"input_ids": prompt_ids + answer_ids, "labels": [IGNORE_INDEX] * len(prompt_ids) + answer_ids}
