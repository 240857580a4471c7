"""GSM8K grade-school math: question -> step-by-step solution ending in `#### <answer>`.

lmlab's prompt style (the task's `prompt_template`) extracts answers in the manner of lm-evaluation-harness's
GSM8K tasks: strict = the first `#### <number>` (or, for CoT prompts, `The answer is <number>.`); flexible =
the last number-like match of `(-?[$0-9.,]{2,})|(-?[0-9]+)`. Before comparing, a leading `(?s).*#### `,
`,` and `$`, and a trailing `.` are removed, and a trailing `.0` is normalised away.
`prompt.style=lm_eval` builds lm-eval's own prompts and scores exactly as it does (lm_eval_format.py).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from types import MappingProxyType
from typing import Any

from datamodules import lm_eval_format
from datamodules.lm_eval_format import LmEvalGSM8KFormat
from datamodules.noise import NoisyProblem, annotate, inject
from datamodules.prompt_format import PromptFormat
from datamodules.sources import DataSourceError
from datamodules.task import Task

CALCULATOR_ANNOTATION = re.compile(r"<<[^<>]*>>")
STRICT = (lm_eval_format.STRICT, re.compile(r"The answer is (\-?[0-9\.\,]+)\."))
FLEXIBLE = lm_eval_format.FLEXIBLE


def normalise(answer: str) -> str:
    """Canonical form of a numeric answer string: no thousands separators, currency or trailing '.'/'.0'."""
    answer = lm_eval_format.without_ignored(answer).strip().rstrip(".")
    return re.sub(r"(\.\d*?)0+$", r"\1", answer).rstrip(".") if "." in answer else answer


def gold_answer(solution: str) -> str:
    """The normalised final answer of a GSM8K solution (`... #### 72`)."""
    return normalise(solution.split("####")[-1])


def extract_strict(generation: str) -> str | None:
    """The answer after the first `#### ` (or `The answer is ...`), normalised; None if absent."""
    for pattern in STRICT:
        match = pattern.search(generation)
        if match:
            return normalise(match.group(1))
    return None


def extract_flexible(generation: str) -> str | None:
    """The last number-like string of the generation, normalised; None if there is none."""
    matches = [a or b for a, b in FLEXIBLE.findall(generation)]
    return normalise(matches[-1]) if matches else None


def validate_record(record: Mapping[str, Any]) -> None:
    """Raise a DataSourceError naming the record's file and line unless it has string question/answer
    fields."""
    for field in ("question", "answer"):
        if not isinstance(record.get(field), str) or not record[field].strip():
            raise DataSourceError(
                f"{record.get('_where', '?')}: GSM8K record needs a non-empty string field '{field}' "
                f"(fields present: {sorted(k for k in record if k != '_where')})"
            )


class GSM8KTask(Task):
    """GSM8K, clean or with injected noise; the prompt template comes from the task config."""

    reward_score = "exact_match_flexible"

    def __init__(
        self,
        prompt_template: str,
        strip_calculator_annotations: bool = True,
        noise: Mapping[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.prompt_template = prompt_template
        self.strip_calculator_annotations = strip_calculator_annotations
        self.noise = noise

    def problem(self, record: Mapping[str, Any]) -> NoisyProblem:
        """The record's question, with the configured noise injected, and its KMI / NI / OC spans."""
        question = record["question"].strip()
        if self.noise:
            return inject(question, self.noise["type"], self.noise["seed"], self.noise.get("sentences", 1))
        return annotate(question)

    def stored_question(self, record: Mapping[str, Any]) -> str:
        """The question as stored (not stripped, as lm-eval reads it), or with the configured noise
        injected."""
        validate_record(record)
        return self.problem(record).question if self.noise else record["question"]

    attention_classes = ("KMI", "NI", "OC")
    prompt_formats = MappingProxyType({"lmlab": PromptFormat, "lm_eval": LmEvalGSM8KFormat})

    def attention_input(self, record: Mapping[str, Any]) -> tuple[str, list[tuple[int, int, str]]]:
        """The prompt (in the chat template where prompts are) and the (start, end, label) character spans of
        its question; template text is OC."""
        return self._labelled_prompt(self.problem(record))

    def clean_input(self, record: Mapping[str, Any]) -> tuple[str, list[tuple[int, int, str]]]:
        """`attention_input` of the same record without the injected noise."""
        return self._labelled_prompt(annotate(record["question"].strip()))

    def _labelled_prompt(self, problem: NoisyProblem) -> tuple[str, list[tuple[int, int, str]]]:
        prompt, placed = self.chat_prompt(self.prompt_template.format(question=problem.question))
        offset = placed + self.prompt_template.index("{question}")
        return prompt, [(offset + s.start, offset + s.end, s.label) for s in problem.spans]

    def format_example(self, record: Mapping[str, Any]) -> tuple[str, str]:
        validate_record(record)
        solution = record["answer"].strip()
        if self.strip_calculator_annotations:
            solution = CALCULATOR_ANNOTATION.sub("", solution)
        return self.prompt_template.format(question=self.problem(record).question), solution

    def reference(self, record: Mapping[str, Any]) -> str:
        return gold_answer(record["answer"])

    def score(self, generation: str, reference: str) -> dict[str, Any]:
        return lm_eval_format.exact_match(extract_strict(generation), extract_flexible(generation), reference)
