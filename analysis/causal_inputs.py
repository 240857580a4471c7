"""What the causal analyses read: facts {prompt, subject, answer} for causal tracing, and problems (a task's
prompt, its labelled token classes, the gold target and, for a noisy task, the clean prompt) for patching,
knockout and the logit lens."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from analysis.allocation import token_classes
from analysis.token_spans import aligned_tokens, tokens_with_offsets
from datamodules import IGNORE_INDEX
from datamodules.task import Task


@dataclass(frozen=True)
class Problem:
    """One task record as the model reads it: prompt tokens with their classes, the gold target tokens
    (teacher-forced), and the clean prompt's tokens aligned with the prompt's (noisy tasks only)."""

    id: str
    text: str
    prompt_ids: list[int]
    classes: list[str]  # per prompt token (empty where the task labels none)
    target_ids: list[int]
    reference: str | None
    clean_ids: list[int] | None = None
    aligned: list[tuple[int, int]] | None = None  # (clean token, prompt token)

    def tokens_of(self, label: str) -> list[int]:
        """Indices of the prompt tokens of class `label`."""
        return [i for i, c in enumerate(self.classes) if c == label]


def answer_token_log_probs(logits: torch.Tensor, prompt_length: int, answer: torch.Tensor) -> torch.Tensor:
    """log P(answer token j | prompt, answer tokens before j) of each row of `logits` [B, T, V] of a prompt of
    `prompt_length` tokens followed by `answer` [A]: [B, A]."""
    start = prompt_length - 1
    log_probs = logits[:, start : start + len(answer)].float().log_softmax(-1)  # [B, A, V]
    return log_probs.gather(-1, answer[None, :, None].expand(len(logits), -1, 1))[..., 0]


def read_facts(settings: DictConfig) -> list[dict[str, Any]]:
    """The facts to trace: `analysis.facts` (a JSONL file, or a list in the config) or `analysis.text` with
    `analysis.subject` (and optionally `analysis.answer`); each needs a prompt and a subject found in it."""
    given = settings.get("facts")
    if settings.get("text"):
        facts = [
            {"prompt": settings.text, "subject": settings.get("subject"), "answer": settings.get("answer")}
        ]
    elif isinstance(given, str):
        path = Path(given)
        if not path.is_file():
            raise FileNotFoundError(f"analysis.facts={given}: no such file")
        facts = []
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if line.strip():
                try:
                    facts.append(json.loads(line) | {"_where": f"{path}:{number}"})
                except json.JSONDecodeError as error:
                    raise ValueError(f"{path}:{number}: not a JSON object ({error.msg})") from error
    else:
        facts = [dict(f) for f in OmegaConf.to_container(given)] if given is not None else []
    for index, fact in enumerate(facts):
        where = fact.pop("_where", f"analysis.facts[{index}]")
        if not isinstance(fact, dict) or not fact.get("prompt") or not fact.get("subject"):
            raise ValueError(f"{where}: a fact needs a prompt and a subject, e.g. {EXAMPLE}")
        if fact["subject"] not in fact["prompt"]:
            raise ValueError(f"{where}: subject {fact['subject']!r} is not in the prompt {fact['prompt']!r}")
        fact.setdefault("id", where)
    return facts


EXAMPLE = '{"prompt": "The Eiffel Tower is in the city of", "subject": "The Eiffel Tower", "answer": "Paris"}'


def task_facts(task: Task, split: str, limit: int, name: str) -> list[dict[str, Any]]:
    """The task's records that are facts (a prompt with its subject: HotpotQA's knowledge pieces)."""
    records = task.records(split)
    facts = [
        {"id": r.get("id", i), "prompt": r["prompt"], "subject": r["subject"], "answer": r.get("answer")}
        for i, r in enumerate(records)
        if r.get("subject") and r.get("prompt") and r["subject"] in r["prompt"]
    ][:limit]
    if not facts:
        raise ValueError(
            f"task '{name}': no record of split '{split}' is a fact with a subject to corrupt; trace a task "
            f"of facts (task=hotpotqa) or give analysis.facts=<jsonl of {EXAMPLE}>"
        )
    return facts


def problem(task: Task, record: dict[str, Any], index: int, clean: bool) -> Problem:
    """The record's prompt (its zero-shot evaluation prompt), token classes and gold target; with `clean`,
    the clean prompt aligned token by token."""
    tokenizer = task.tokenizer
    text, spans = task.attention_input(record)
    ids, offsets = tokens_with_offsets(tokenizer, text)
    classes = tuple(getattr(task, "attention_classes", ()))
    labels = token_classes(offsets, spans, text, classes) if classes else []
    encoded = task.tokenize(*task.format_example(record))
    target = [
        t for t, label in zip(encoded["input_ids"], encoded["labels"], strict=True) if label != IGNORE_INDEX
    ]
    reference = _reference(task, record)
    identity = str(record.get("id", record.get("_where", index)))
    if not clean:
        return Problem(identity, text, ids, labels, target, reference)
    try:
        clean_text, _ = task.clean_input(record)
    except NotImplementedError as error:
        raise ValueError(
            f"{error}; patching needs a noisy task (task=gsm8k_inf, gsm8k_rcs or gsm8k_sd)"
        ) from error
    clean_ids, clean_offsets = tokens_with_offsets(tokenizer, clean_text)
    aligned = aligned_tokens(clean_text, clean_offsets, text, offsets)
    return Problem(identity, text, ids, labels, target, reference, clean_ids, aligned)


def _reference(task: Task, record: dict[str, Any]) -> str | None:
    try:
        return task.reference(record)
    except NotImplementedError:
        return None


def text_problem(tokenizer: Any, text: str) -> Problem:
    """Free text as a problem with no target: the lens follows the model's own next token."""
    ids, _ = tokens_with_offsets(tokenizer, text)
    return Problem("text", text, ids, [], [], None)
