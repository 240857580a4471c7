"""lm-evaluation-harness's GSM8K task (`gsm8k`, task version 3.0 in lm-eval 0.4.x), reproduced exactly.

`evaluate.py prompt.style=lm_eval` uses it so a GSM8K score can be compared with lm-eval's published ones:
- prompt: `num_fewshot` exemplars "Question: <question>\\nAnswer: <full solution, <<calculator>> notes kept>",
  each followed by a blank line, then "Question: <question>\\nAnswer:"; in a chat template
  (`prompt.chat_template`), the messages lm-eval's `--apply_chat_template` renders: that text as one user
  message, or with `prompt.fewshot_as_multiturn` each exemplar as a user and an assistant turn;
- exemplars: drawn per problem from the whole train split by one `random.Random(seed)` (lm-eval's default
  fewshot seed is 1234) in test order, as lm-eval's ContextSampler does;
- generation stops at "Question:", "</s>" or "<|im_end|>";
- strict-match: the first `#### <number>` ("[invalid]" when absent); flexible-extract: the last number-like
  string; both compared with the gold solution after removing ",", "$", everything up to "#### " and a
  trailing "." and lower-casing, with no further normalisation ("18.0" does not equal "18").
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from datamodules.prompt_format import PromptFormat
from datamodules.sources import load_split

QUESTION_TEMPLATE = "Question: {question}\nAnswer:"
TARGET_DELIMITER = " "
STOP_STRINGS = ("Question:", "</s>", "<|im_end|>")
FALLBACK = "[invalid]"
STRICT = re.compile(r"#### (\-?[0-9\.\,]+)")
FLEXIBLE = re.compile(r"(-?[$0-9.,]{2,})|(-?[0-9]+)")
IGNORED = (re.compile(","), re.compile(r"\$"), re.compile(r"(?s).*#### "), re.compile(r"\.$"))


def exemplars_per_problem(
    pool: Sequence[Mapping[str, Any]], problems: int, count: int, seed: int
) -> list[list[Any]]:
    """`count` exemplars for each of `problems` test problems, drawn in order from one seeded generator."""
    generator, pool = random.Random(seed), list(pool)
    return [generator.sample(pool, count) if count else [] for _ in range(problems)]


def strict_match(generation: str) -> str:
    """The number after the first `#### `, or "[invalid]"."""
    match = STRICT.search(generation)
    return match.group(1).strip() if match else FALLBACK


def flexible_extract(generation: str) -> str:
    """The last number-like string of the generation, or "[invalid]"."""
    matches = FLEXIBLE.findall(generation)
    if not matches:
        return FALLBACK
    return next((group for group in matches[-1] if group), FALLBACK).strip()


def without_ignored(text: str) -> str:
    """`text` without what lm-eval's GSM8K exact_match ignores (regexes_to_ignore): thousands separators,
    currency, everything up to `#### `, a final '.'."""
    for pattern in IGNORED:
        text = pattern.sub("", text)
    return text


def comparable(text: str) -> str:
    """`text` as lm-eval's exact_match compares it for GSM8K (regexes_to_ignore, ignore_case)."""
    return without_ignored(text).lower()


def exact_match(
    strict: str | None, flexible: str | None, gold: str, canonical: Callable[[str], str] | None = None
) -> dict[str, Any]:
    """The strict and flexible extractions of a generation and their 0/1 exact match against `gold`, each
    put in `gold`'s form by `canonical` first (when given): the scores of every GSM8K prompt style."""
    same = canonical or (lambda text: text)
    return {
        "extracted_strict": strict,
        "extracted_flexible": flexible,
        "exact_match_strict": float(strict is not None and same(strict) == gold),
        "exact_match_flexible": float(flexible is not None and same(flexible) == gold),
    }


def score(generation: str, gold: str) -> dict[str, Any]:
    """Both lm-eval extractions of `generation` and their 0/1 exact match against `gold`
    (`comparable(solution)`)."""
    return exact_match(strict_match(generation), flexible_extract(generation), gold, comparable)


class LmEvalGSM8KFormat(PromptFormat):
    """`prompt.style=lm_eval` of the GSM8K tasks: lm-eval's prompts, exemplar draws, stop strings and
    scoring (the question noise-injected where the task injects noise); in a chat template, as lm-eval's
    `--apply_chat_template` (and `--fewshot_as_multiturn`) renders them."""

    target_delimiter = TARGET_DELIMITER

    def fewshot_exemplars(
        self, records: list[dict[str, Any]], count: int, seed: int
    ) -> list[list[dict[str, Any]]]:
        """A draw per problem from the whole train split (no validation part held out)."""
        pool = load_split(self.task.source, self.task.splits["train"], "train") if count else []
        return exemplars_per_problem(pool, len(records), count, seed)

    def example(self, record: Mapping[str, Any]) -> tuple[str, str]:
        return QUESTION_TEMPLATE.format(question=self.task.stored_question(record)), record["answer"]

    def question(self, record: Mapping[str, Any]) -> str:
        return QUESTION_TEMPLATE.format(question=self.task.stored_question(record))

    def stop_strings(self, configured: list[str]) -> list[str]:
        """Exactly lm-eval's, in place of the configured ones (a completion keeps the blank line before
        "Question:", as lm-eval's does)."""
        return list(STOP_STRINGS)

    def reference(self, record: Mapping[str, Any]) -> str:
        return comparable(record["answer"])

    def score(self, generation: str, reference: str) -> dict[str, Any]:
        return score(generation, reference)
