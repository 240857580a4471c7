"""Socratic math tutoring: multi-turn teacher (assistant) / student (user) dialogues.

Three input formats, recognised per record:
- SocraticMATH: `{"id", "conversations": [{"from": "user"|"assistant", "value"}]}`;
- SocraTeach: a problem `{"question", "answer", "analysis", "steps", "dialogues": {id: [{"system": teacher
  turn, "user": student reply}, ...]}}` (a JSON object of such problems keyed by id is read as a list);
- GSM8K Socratic (`openai/gsm8k` config `socratic`, or `test_socratic.jsonl`): solution lines
  `sub-question ** step` become teacher questions and student answers (`gsm8k_dialogue`).

Dialogues are rendered with the tokenizer's chat template where prompts are (`prompt.chat_template`), else
with a plain "Student: / Teacher:" template; the loss covers the teacher turns only: the text each assistant
turn adds after the generation prompt. Evaluation generates a teacher turn from the dialogue before it and
scores it against the reference with BLEU and ROUGE-L (`text_metrics.tokenize`: `13a` for English,
`zh` or `char` for Chinese, i.e. characters, not whitespace) and, on the final teacher turn of a
dialogue that has an answer, whether the generated turn states it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from pathlib import Path
from types import MappingProxyType
from typing import Any

import numpy as np

from datamodules.dialogues import convert, dialogues_of
from datamodules.gsm8k import FLEXIBLE, extract_flexible, normalise
from datamodules.prompt_format import PromptFormat
from datamodules.sources import DataSourceError
from datamodules.task import Task
from datamodules.text_metrics import sentence_scores, text_tokens

PLAIN_ROLES = {"system": "System", "user": "Student", "assistant": "Teacher"}


def states_answer(text: str, answer: str) -> bool:
    """Whether `text` states `answer`: a numeric answer as its last number (GSM8K flexible match), else
    verbatim."""
    if FLEXIBLE.fullmatch(answer.strip()):
        return extract_flexible(text) == normalise(answer)
    return answer.strip() in text


class DialoguePromptFormat(PromptFormat):
    """lmlab's style for dialogues: the conversation before the teacher turn, in the chat template, with the
    generation prompt of the next turn (no exemplars)."""

    def prompt(self, record: Mapping[str, Any], exemplars: list[Mapping[str, Any]]) -> str:
        return self.task.render(list(record["messages"]), add_generation_prompt=True)


class SocraticTask(Task):
    """Tutoring dialogues: teacher-turn loss for training, next-teacher-turn generation for evaluation."""

    extra_stop_strings = ("\nStudent:",)
    prompt_formats = MappingProxyType({"lmlab": DialoguePromptFormat})

    def __init__(
        self,
        system_prompt: str | None = None,
        eval_turns: str = "last",
        text_metrics: Mapping[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if eval_turns not in ("last", "all"):
            raise ValueError(f"task.eval_turns must be 'last' or 'all', got {eval_turns!r}")
        self.system_prompt, self.eval_turns = system_prompt, eval_turns
        self.tokenize_mode = (text_metrics or {}).get("tokenize", "13a")

    def records(self, stage: str) -> list[dict[str, Any]]:
        dialogues = []
        for record in super().records(stage):
            for dialogue in dialogues_of(record):
                system = self.system_prompt or (self.chat_style and self.chat_style.system)
                messages = ([{"role": "system", "content": system}] if system else []) + dialogue["messages"]
                if not any(m["role"] == "assistant" for m in messages):
                    raise DataSourceError(
                        f"{record.get('_where', '?')}: dialogue has no teacher (assistant) turn"
                    )
                dialogues.append({**dialogue, "messages": messages, "_where": record.get("_where")})
        return dialogues

    def render(self, messages: list[dict[str, str]], add_generation_prompt: bool = False) -> str:
        """The dialogue as text: the chat template where prompts are in it, else the plain Student/Teacher
        template."""
        if self.chat_style is not None:
            return super().render(messages, add_generation_prompt)
        text = "".join(f"{PLAIN_ROLES[m['role']]}: {m['content']}\n" for m in messages)
        return text + ("Teacher:" if add_generation_prompt else "")

    def tokenize_record(self, record: Mapping[str, Any]) -> dict[str, list[int]]:
        return self.tokenize_conversation(record["messages"])

    attention_classes = ("STUDENT", "TEACHER", "OTHER")

    def attention_input(self, record: Mapping[str, Any]) -> tuple[str, list[tuple[int, int, str]]]:
        """The dialogue before its last teacher turn, as the model reads it to generate that turn: student
        turns are STUDENT, earlier teacher turns TEACHER, the template and system prompt OTHER."""
        messages = list(record["messages"])
        context = messages[: max(i for i, m in enumerate(messages) if m["role"] == "assistant")]
        text = self.render(context, add_generation_prompt=True)
        spans, done = [], 0
        for message in context:
            label = {"user": "STUDENT", "assistant": "TEACHER"}.get(message["role"])
            start = text.find(message["content"], done)
            if label and message["content"] and start >= 0:
                spans.append((start, start + len(message["content"]), label))
                done = start + len(message["content"])
        return text, spans

    def evaluation_records(self) -> list[dict[str, Any]]:
        """One example per teacher turn (`eval_turns: all`) or per dialogue's last teacher turn (`last`)."""
        examples = []
        for dialogue in self.records("test"):
            turns = [i for i, m in enumerate(dialogue["messages"]) if m["role"] == "assistant"]
            for index in turns if self.eval_turns == "all" else turns[-1:]:
                examples.append(
                    {
                        **dialogue,
                        "messages": dialogue["messages"][:index],
                        "turn": dialogue["messages"][index]["content"],
                        "final": index == turns[-1],
                    }
                )
        return examples

    def reference(self, record: Mapping[str, Any]) -> dict[str, Any]:
        answer = record.get("answer") if record.get("final") else None
        return {"turn": record["turn"], "answer": None if answer is None else str(answer)}

    def score(self, generation: str, reference: Mapping[str, Any]) -> dict[str, Any]:
        """Sentence BLEU (smoothed) and ROUGE-L F1 of one generated turn; answer_correct on final turns."""
        return {
            **sentence_scores(generation, reference["turn"], self.tokenize_mode),
            "answer_correct": None
            if reference["answer"] is None
            else float(states_answer(generation, reference["answer"])),
        }

    def corpus_metrics(self, generations: list[str], references: list[Any]) -> dict[str, float]:
        """Corpus BLEU and mean ROUGE-L F1 (torchmetrics) over all generated teacher turns."""
        from torchmetrics.text import ROUGEScore, SacreBLEUScore

        if not generations:
            return {}
        turns = [reference["turn"] for reference in references]
        bleu = SacreBLEUScore(tokenize=self.tokenize_mode)(generations, [[turn] for turn in turns])
        rouge = ROUGEScore(
            rouge_keys=("rougeL",),
            normalizer=lambda text: text,
            tokenizer=lambda text: text_tokens(text, self.tokenize_mode),
        )(generations, turns)
        return {"corpus_bleu": float(bleu), "corpus_rouge_l": float(rouge["rougeL_fmeasure"])}

    def corpus_statistics(
        self, generations: list[str], references: list[Any]
    ) -> dict[str, Callable[[np.ndarray], float]]:
        """Corpus BLEU and mean ROUGE-L of any subset of the turns from per-turn sufficient statistics (n-gram
        matches and counts, lengths; ROUGE-L F1), equal to `corpus_metrics` on that subset."""
        from torchmetrics.text import SacreBLEUScore

        counts = []  # per turn: [matches 1..4, n-grams 1..4, generated length, reference length]
        for generation, reference in zip(generations, references, strict=True):
            bleu = SacreBLEUScore(tokenize=self.tokenize_mode)
            bleu.update([generation], [[reference["turn"]]])
            counts.append(
                [
                    *bleu.numerator.tolist(),
                    *bleu.denominator.tolist(),
                    float(bleu.preds_len),
                    float(bleu.target_len),
                ]
            )
        stats = np.array(counts)  # [turns, 10]
        rouge = np.array([self.score(g, r)["rouge_l"] for g, r in zip(generations, references, strict=True)])

        def corpus_bleu(indices: np.ndarray) -> float:
            total = stats[indices].sum(axis=0)
            matches, ngrams, generated, referenced = total[:4], total[4:8], total[8], total[9]
            if matches.min() == 0:
                return 0.0
            brevity = 1.0 if generated > referenced else math.exp(1 - referenced / generated)
            return float(brevity * math.exp(np.log(matches / ngrams).mean()))

        return {"corpus_bleu": corpus_bleu, "corpus_rouge_l": lambda indices: float(rouge[indices].mean())}


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(
        description="Convert GSM8K Socratic / SocraTeach dialogues to SocraticMATH JSON"
    )
    parser.add_argument("--input", type=Path, required=True, help="e.g. data/gsm8k/test_socratic.jsonl")
    parser.add_argument("--output", type=Path, required=True, help="e.g. data/socratic_gsm8k.json")
    arguments = parser.parse_args()
    print(f"{convert(arguments.input, arguments.output)} dialogues -> {arguments.output}")
