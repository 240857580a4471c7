"""The sentences of a word problem and who it is about: sentence boundaries that abbreviations and decimals do
not break, the question sentence, and the problem's main subject (the name its distractors reuse)."""

from __future__ import annotations

import re
from collections import Counter

# A sentence ends at . ! or ? followed by whitespace and an opening capital, digit, quote or $.
# Decimals ("3.5"), money ("$1.50") and abbreviations ("Mr. Lee") do not end a sentence.
ABBREVIATIONS = ("Mr", "Mrs", "Ms", "Dr", "St", "Jr", "Sr", "vs", "etc", "e.g", "i.e", "a.m", "p.m")


SENTENCE_END = re.compile(r"(?<=[.!?])[\"')\]]?\s+(?=[A-Z0-9\"'$(])")


NAME = re.compile(r"\b[A-Z][a-z]+\b")


NOT_A_SUBJECT = {
    "The",
    "A",
    "An",
    "If",
    "How",
    "What",
    "Each",
    "Every",
    "In",
    "On",
    "At",
    "After",
    "Before",
    "She",
    "He",
    "They",
    "It",
    "His",
    "Her",
    "Their",
    "There",
    "This",
    "That",
    "When",
    "Then",
    "Mr",
    "Mrs",
    "Ms",
    "Dr",
    "Monday",
    "Tuesday",
    "Wednesday",
    "Thursday",
    "Friday",
    "Saturday",
    "Sunday",
    "January",
    "February",
    "March",
    "April",
    "May",
    "June",
    "July",
    "August",
    "September",
    "October",
    "November",
    "December",
    "For",
    "From",
    "To",
    "With",
    "But",
    "And",
    "So",
    "Some",
    "All",
    "One",
    "Two",
    "Three",
    "Four",
    "Five",
    "Half",
    "Find",
    "Calculate",
    "Determine",
    "Assuming",
    "Suppose",
    "Its",
    "We",
    "You",
    "I",
}


def split_sentences(text: str) -> list[tuple[int, int]]:
    """Character ranges [start, end) of the sentences of `text`, trailing whitespace excluded."""
    starts = [0]
    for match in SENTENCE_END.finditer(text):
        before = text[: match.start()]
        if before.endswith(tuple(f"{a}." for a in ABBREVIATIONS)):
            continue
        starts.append(match.end())
    ends = starts[1:] + [len(text)]
    return [(s, s + len(text[s:e].rstrip())) for s, e in zip(starts, ends, strict=True)]


def question_sentence(sentences: list[tuple[int, int]], text: str) -> int:
    """Index of the sentence that asks the question (the last one with '?', else the last one)."""
    asking = [i for i, (s, e) in enumerate(sentences) if "?" in text[s:e]]
    return asking[-1] if asking else len(sentences) - 1


def main_subject(text: str) -> str:
    """The problem's most frequent capitalised name, or 'the family' when it has none."""
    names = [m.group() for m in NAME.finditer(text) if m.group() not in NOT_A_SUBJECT]
    return Counter(names).most_common(1)[0][0] if names else "the family"
