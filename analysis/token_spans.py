"""Tokens of a text and where each stands in it: a character span's tokens (a fact's subject), and the tokens
two texts share (a problem's clean and noisy prompts, for patching one into the other)."""

from __future__ import annotations

from difflib import SequenceMatcher
from typing import Any


def tokens_with_offsets(tokenizer: Any, text: str) -> tuple[list[int], list[tuple[int, int]]]:
    """The token ids of `text` (with the tokenizer's special tokens) and each one's (start, end) characters;
    a special token has an empty span."""
    try:
        encoded = tokenizer(text, return_offsets_mapping=True)
        return list(encoded["input_ids"]), [tuple(span) for span in encoded["offset_mapping"]]
    except NotImplementedError:  # a slow tokenizer: each token's span from the decoded prefixes
        ids = list(tokenizer(text)["input_ids"])
        spans, cursor = [], 0
        for end in range(1, len(ids) + 1):
            decoded = tokenizer.decode(ids[:end], skip_special_tokens=True)
            reached = len(decoded) if text.startswith(decoded) else cursor
            spans.append((cursor, reached))
            cursor = reached
        return ids, spans


def span_tokens(offsets: list[tuple[int, int]], start: int, end: int) -> list[int]:
    """Indices of the tokens that overlap characters [start, end)."""
    return [i for i, (s, e) in enumerate(offsets) if e > s and s < end and e > start]


def aligned_tokens(
    source: str, source_offsets: list[tuple[int, int]], target: str, target_offsets: list[tuple[int, int]]
) -> list[tuple[int, int]]:
    """(source token, target token) pairs that stand for the same characters of the text both share: the
    target token's characters all lie in one block the two texts have in common, and map to exactly the
    source token's characters (special tokens at the same index also align)."""
    blocks = SequenceMatcher(None, source, target, autojunk=False).get_matching_blocks()
    by_span = {span: i for i, span in enumerate(source_offsets) if span[1] > span[0]}
    pairs = []
    for j, (start, end) in enumerate(target_offsets):
        if end <= start:
            if j < len(source_offsets) and source_offsets[j][1] <= source_offsets[j][0]:
                pairs.append((j, j))
            continue
        for a, b, size in blocks:
            if b <= start and end <= b + size:
                source_span = (start - b + a, end - b + a)
                if source_span in by_span:
                    pairs.append((by_span[source_span], j))
                break
    return pairs
