"""Tutoring dialogues as lists of turns, from the three record formats the Socratic task reads (SocraticMATH,
SocraTeach, GSM8K Socratic: datamodules/socratic.py describes them), and their conversion to SocraticMATH
JSON (`python -m datamodules.socratic`)."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from datamodules.gsm8k import CALCULATOR_ANNOTATION, normalise
from datamodules.sources import DataSourceError, read_file

SOCRATICMATH_ROLES = {
    "user": "user",
    "human": "user",
    "assistant": "assistant",
    "gpt": "assistant",
    "system": "system",
}


def gsm8k_dialogue(question: str, solution: str) -> dict[str, Any]:
    """A tutoring dialogue from a GSM8K Socratic solution: teacher asks each sub-question, student answers
    it."""
    messages = [{"role": "user", "content": f"Can you help me solve this problem? {question.strip()}"}]
    lines = [line.strip() for line in solution.split("####")[0].splitlines() if line.strip()]
    for line in lines:
        ask, _, step = line.partition(" ** ")
        if not step:
            ask, step = "What do you get next?", ask
        messages += [
            {"role": "assistant", "content": ask.strip()},
            {"role": "user", "content": CALCULATOR_ANNOTATION.sub("", step).strip()},
        ]
    answer = normalise(solution.split("####")[-1])
    messages.append({"role": "assistant", "content": f"Well done! So the answer is {answer}."})
    return {"messages": messages, "answer": answer}


def dialogues_of(record: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The dialogues ({messages, answer, id}) of one record in any of the three formats."""
    where = record.get("_where", "?")
    if isinstance(record.get("conversations"), list):
        messages = []
        for turn in record["conversations"]:
            role = SOCRATICMATH_ROLES.get(str(turn.get("from")))
            if role is None or not isinstance(turn.get("value"), str):
                raise DataSourceError(
                    f"{where}: SocraticMATH turn needs 'from' in {sorted(SOCRATICMATH_ROLES)} and a string "
                    "'value'"
                )
            messages.append({"role": role, "content": turn["value"]})
        return [{"id": record.get("id"), "messages": messages, "answer": record.get("answer")}]
    if isinstance(record.get("dialogues"), Mapping):
        opening = f"Please guide me to solve this problem: {record.get('question', '').strip()}"
        dialogues = []
        for key, rounds in record["dialogues"].items():
            messages = [{"role": "user", "content": opening}]
            for turn in rounds:
                if isinstance(turn.get("system"), str):
                    messages.append({"role": "assistant", "content": turn["system"]})
                if isinstance(turn.get("user"), str):
                    messages.append({"role": "user", "content": turn["user"]})
            dialogues.append(
                {"id": f"{record.get('id')}/{key}", "messages": messages, "answer": record.get("answer")}
            )
        return dialogues
    if isinstance(record.get("question"), str) and " ** " in str(record.get("answer", "")):
        return [{"id": record.get("id"), **gsm8k_dialogue(record["question"], record["answer"])}]
    raise DataSourceError(
        f"{where}: not a tutoring dialogue: expected SocraticMATH ('conversations'), SocraTeach "
        "('dialogues') or GSM8K Socratic ('question' + 'answer' with ' ** ') fields; got "
        f"{sorted(k for k in record if k != '_where')}"
    )


def convert(input_path: Path, output_path: Path) -> int:
    """Write the dialogues of a GSM8K Socratic / SocraTeach / SocraticMATH file as SocraticMATH JSON; return
    the count."""
    records = [
        {
            "id": dialogue.get("id") or f"{input_path.stem}-{i}",
            "conversations": [{"from": m["role"], "value": m["content"]} for m in dialogue["messages"]],
            "answer": dialogue.get("answer"),
        }
        for i, dialogue in enumerate(d for record in read_file(input_path) for d in dialogues_of(record))
    ]
    output_path.parent.mkdir(parents=True, exist_ok=True)
    output_path.write_text(json.dumps(records, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
    return len(records)
