"""`prompt.style=lm_eval`: lm-evaluation-harness's GSM8K prompts, exemplar draws, stop strings and
scoring."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
from omegaconf import open_dict

import datamodules
from datamodules import lm_eval_format
from evaluation import evaluate
from modeling import models
from tests.conftest import compose_config

TRAIN = [
    {"question": "Ann has 3 pens and buys 2 more. How many pens? ", "answer": "3+2=<<3+2=5>>5\n#### 5"},
    {
        "question": "Bo had $1,200 and spent $200. How much is left?",
        "answer": "1,200-200=<<1200-200=1000>>1,000\n#### 1,000",
    },
    {"question": "Cy runs 4 km a day for 3 days. How far?", "answer": "4*3=<<4*3=12>>12\n#### 12"},
    {"question": "Di has 10 eggs and uses half. How many remain?", "answer": "10/2=<<10/2=5>>5\n#### 5"},
]
TEST = [
    {"question": "Ed has 7 cats and gets 1 more. How many cats?", "answer": "7+1=<<7+1=8>>8\n#### 8"},
    {"question": "Flo bakes 6 pies and sells 4. How many left?", "answer": "6-4=<<6-4=2>>2\n#### 2"},
]


@pytest.fixture
def gsm8k_files(tmp_path: Path) -> str:
    """A task.data_files override for four train and two test problems written here."""
    for name, records in (("train", TRAIN), ("test", TEST)):
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return f"task.data_files={{train: {tmp_path / 'train.jsonl'}, test: {tmp_path / 'test.jsonl'}}}"


def lm_eval_datamodule(*overrides: str):
    cfg = compose_config("model=tiny_llama", "prompt.style=lm_eval", *overrides, config_name="evaluate")
    _, tokenizer = models.build(cfg.model)
    return datamodules.build_task(cfg, tokenizer)


def test_prompt_is_lm_evals_text_with_exemplars_drawn_per_problem(gsm8k_files: str) -> None:
    task = lm_eval_datamodule(gsm8k_files)
    records = task.evaluation_records()
    exemplars = task.prompt_format.fewshot_exemplars(records, 2, 1234)
    # lm-eval's ContextSampler: one Random(seed) draws each test problem's exemplars in test order, from the
    # whole train split (lmlab's own style holds out a validation part and shares one draw)
    draw = random.Random(1234)
    expected = [draw.sample(TRAIN, 2), draw.sample(TRAIN, 2)]
    assert [[e["question"] for e in shots] for shots in exemplars] == [
        [e["question"] for e in s] for s in expected
    ]
    assert exemplars[0] != exemplars[1]

    first, second = exemplars[0]
    prompt = task.prompt_format.prompt(records[0], exemplars[0])
    assert prompt == (
        f"Question: {first['question']}\nAnswer: {first['answer']}\n\n"
        f"Question: {second['question']}\nAnswer: {second['answer']}\n\n"
        "Question: Ed has 7 cats and gets 1 more. How many cats?\nAnswer:"
    )
    # calculator notes and the question's own trailing space are kept, as lm-eval keeps them
    shots = {e["question"]: e for e in TRAIN}
    assert "<<" in prompt and all(e["question"] in shots for e in exemplars[0])
    assert (
        task.prompt_format.prompt(records[1], [])
        == "Question: Flo bakes 6 pies and sells 4. How many left?\nAnswer:"
    )
    # lm-eval's `until`, replacing generation.stop_strings: "\n\nQuestion:" would also cut the blank line it
    # keeps
    assert task.prompt_format.stop_strings(["\n\nQuestion:"]) == ["Question:", "</s>", "<|im_end|>"]


def test_lmlab_style_is_unchanged(gsm8k_files: str) -> None:
    cfg = compose_config("model=tiny_llama", gsm8k_files, config_name="evaluate")
    _, tokenizer = models.build(cfg.model)
    task = datamodules.build_task(cfg, tokenizer)
    records = task.evaluation_records()
    exemplars = task.prompt_format.fewshot_exemplars(records, 1, 1234)
    assert exemplars[0] == exemplars[1]
    prompt = task.prompt_format.prompt(records[0], exemplars[0])
    assert prompt.endswith(
        "Question: Ed has 7 cats and gets 1 more. How many cats?\nAnswer: Let's think step by step.\n"
    )
    assert "<<" not in prompt and task.prompt_format.stop_strings(["Q:"]) == ["Q:"]


@pytest.mark.parametrize(
    ("generation", "strict", "flexible", "gold", "strict_right", "flexible_right"),
    [
        ("3+2=5\n#### 5", "5", "5", "#### 5", 1.0, 1.0),
        # lm-eval's strict does not normalise 18.0 and does not read "The answer is N."
        ("So 9*2=18.\n#### 18.0", "18.0", "18.0", "#### 18", 0.0, 0.0),
        ("The answer is 18.", "[invalid]", "18.", "#### 18", 0.0, 1.0),
        ("She has $1,000.\n#### $1,000.", "[invalid]", "$1,000.", "#### 1,000", 0.0, 1.0),
        ("#### 1,000.", "1,000.", "1,000.", "x\n#### 1,000", 1.0, 1.0),
        ("no number here", "[invalid]", "[invalid]", "#### 3", 0.0, 0.0),
        ("#### 4\n#### 7", "4", "7", "#### 4", 1.0, 0.0),
    ],
)
def test_scoring_is_lm_evals(
    generation: str, strict: str, flexible: str, gold: str, strict_right: float, flexible_right: float
) -> None:
    score = lm_eval_format.score(generation, lm_eval_format.comparable(gold))
    assert (score["extracted_strict"], score["extracted_flexible"]) == (strict, flexible)
    assert (score["exact_match_strict"], score["exact_match_flexible"]) == (strict_right, flexible_right)


def test_evaluate_in_lm_eval_style(gsm8k_files: str, tmp_path: Path) -> None:
    cfg = compose_config(
        "model=tiny_llama",
        gsm8k_files,
        "prompt.style=lm_eval",
        "prompt.num_fewshot=3",
        "print_config=false",
        "generation.max_new_tokens=6",
        config_name="evaluate",
    )
    with open_dict(cfg):
        cfg.paths.output_dir = str(tmp_path / "run")
    results = evaluate.run(cfg)
    rows = [json.loads(line) for line in (tmp_path / "run" / "predictions.jsonl").read_text().splitlines()]
    assert [r["gold"] for r in rows] == ["8", "2"]
    assert all(r["prompt"].count("Question:") == 4 and r["prompt"].endswith("\nAnswer:") for r in rows)
    for row in rows:
        assert row == row | lm_eval_format.score(row["generation"], row["gold"])
    assert results["metrics"]["pass@1_strict"] == sum(r["exact_match_strict"] for r in rows) / 2


def test_lm_eval_style_on_another_task_names_the_setting() -> None:
    with pytest.raises(ValueError, match=r"prompt.style=lm_eval: ClassificationTask builds only \['lmlab'\]"):
        lm_eval_datamodule("task=classification", "task.source=bundled")
