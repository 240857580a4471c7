"""Noise injection: deterministic, original text and answer intact, exact spans, three distinct kinds."""

from __future__ import annotations

import json
import re
from collections import Counter

import pytest

from datamodules.gsm8k import GSM8KTask
from datamodules.noise import NOISE_TYPES, NUMBER_WORDS, export, inject
from datamodules.sentences import main_subject, split_sentences
from datamodules.sources import SAMPLES_DIR, load_split
from modeling.models import byte_level_tokenizer

BUNDLED = {"kind": "bundled", "bundled": "gsm8k"}
QUESTIONS = [r["question"] for split in ("train", "test") for r in load_split(BUNDLED, split)]
TRICKY = "Mr. Lee paid $1,250.75 for 2.5 kg of tea. Dr. Ruiz bought 3 more. How much did Mr. Lee pay per kg?"


def without_noise(text: str, spans: list[dict]) -> str:
    for span in sorted((s for s in spans if s["label"] == "NI"), key=lambda s: -s["start"]):
        text = text[: span["start"]] + text[span["end"] + 1 :]  # each distractor is followed by one space
    return text


def test_sentence_splitter_keeps_decimals_money_and_abbreviations_intact() -> None:
    sentences = [TRICKY[s:e] for s, e in split_sentences(TRICKY)]
    assert sentences == [
        "Mr. Lee paid $1,250.75 for 2.5 kg of tea.",
        "Dr. Ruiz bought 3 more.",
        "How much did Mr. Lee pay per kg?",
    ]


def test_main_subject_is_the_most_frequent_name() -> None:
    assert main_subject("Maya has 3 pens. She gives Tom one. Maya keeps the rest.") == "Maya"
    assert main_subject("A robe takes 2 bolts. How many in total?") == "the family"


@pytest.mark.parametrize("noise_type", NOISE_TYPES)
def test_injection_is_deterministic_and_seed_dependent(noise_type: str) -> None:
    first = [inject(q, noise_type, seed=0).question for q in QUESTIONS]
    assert first == [inject(q, noise_type, seed=0).question for q in QUESTIONS]
    other = [inject(q, noise_type, seed=1).question for q in QUESTIONS]
    assert sum(a != b for a, b in zip(first, other, strict=True)) > len(QUESTIONS) // 2


@pytest.mark.parametrize("noise_type", NOISE_TYPES)
@pytest.mark.parametrize("question", [*QUESTIONS, TRICKY])
def test_original_preserved_and_spans_exact(noise_type: str, question: str) -> None:
    problem = inject(question, noise_type, seed=7, sentences=2).to_record()
    text, spans = problem["question"], problem["spans"]
    assert text != question
    assert without_noise(text, spans) == question
    assert [(s["start"], s["end"]) for s in spans][0][0] == 0 and spans[-1]["end"] == len(text)
    assert all(
        a["end"] == b["start"] and a["label"] != b["label"] for a, b in zip(spans, spans[1:], strict=False)
    )
    noise_text = [text[s["start"] : s["end"]] for s in spans if s["label"] == "NI"]
    assert " ".join(noise_text) == " ".join(problem["distractors"])
    key_text = " ".join(text[s["start"] : s["end"]] for s in spans if s["label"] == "KMI")
    asked = question[split_sentences(question)[-1][0] :]
    assert asked in key_text
    for number in re.findall(r"\d[\d,]*(?:\.\d+)?", question):
        assert number in key_text
    for span in spans:  # numbers the injector added are noise, never key information
        if span["label"] == "KMI":
            assert not any(
                span["start"] < n["end"] and n["start"] < span["end"] for n in spans if n["label"] == "NI"
            )


def test_the_three_noise_types_differ() -> None:
    for question in QUESTIONS:
        texts = {inject(question, t, seed=0).question for t in NOISE_TYPES}
        assert len(texts) == 3


def test_rcs_adds_correct_calculations_and_sd_adds_no_numbers() -> None:
    for question in QUESTIONS:
        (rcs,) = inject(question, "rcs", seed=3).distractors
        a, b, result = (float(n) for n in re.findall(r"-?\d+(?:\.\d+)?", rcs)[:3])
        assert result in (pytest.approx(a + b), pytest.approx(a * b)), rcs
        words = re.findall(r"[a-z]+", question.lower())
        quantities = {float(n) for n in re.findall(r"\d+(?:\.\d+)?", question.replace(",", ""))}
        assert {a, b} <= quantities | {float(NUMBER_WORDS[w]) for w in words if w in NUMBER_WORDS}, rcs
        (sd,) = inject(question, "sd", seed=3).distractors
        assert not re.search(r"\d", sd)


def test_distractors_vary_across_problems() -> None:
    for noise_type in NOISE_TYPES:
        counts = Counter(tuple(inject(q, noise_type, seed=0).distractors) for q in QUESTIONS)
        assert counts.most_common(1)[0][1] <= 3, noise_type


def test_noisy_task_keeps_the_gold_answer_and_the_solution() -> None:
    def module(noise):
        return GSM8KTask(
            tokenizer=byte_level_tokenizer(),
            source=BUNDLED,
            splits={"train": "train", "test": "test"},
            prompt_template="Q: {question}\nA:",
            noise=noise,
        )

    clean, noisy = module(None), module({"type": "inf", "seed": 0, "sentences": 1})
    for record in clean.records("test"):
        assert noisy.reference(record) == clean.reference(record)
        assert noisy.format_example(record)[1] == clean.format_example(record)[1]
        assert noisy.format_example(record)[0] != clean.format_example(record)[0]


def test_export_writes_three_jsonl_files_with_spans(tmp_path) -> None:
    paths = export(SAMPLES_DIR / "gsm8k" / "test.jsonl", tmp_path, seed=0)
    assert [p.name for p in paths] == [f"gsm8k_{t}_test.jsonl" for t in NOISE_TYPES]
    for path in paths:
        records = [json.loads(line) for line in path.read_text().splitlines()]
        assert len(records) == 8
        assert all(r["answer"].rstrip().split("#### ")[-1] and r["spans"] for r in records)
        assert all(without_noise(r["question"], r["spans"]) == r["original_question"] for r in records)
