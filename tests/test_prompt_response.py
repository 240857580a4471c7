"""`task=prompt_response`: a researcher's own data with columns mapped in config, trained (loss on the
response) and evaluated (exact match after extraction, ROUGE-L, BLEU) without code; bad mappings named."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow
import pyarrow.parquet
import pytest
from omegaconf import open_dict

import datamodules
from datamodules import IGNORE_INDEX
from datamodules.sources import DataSourceError
from evaluation import evaluate
from modeling import models
from modeling.models import CHATML
from runtime.training import run as train
from tests.conftest import compose_config

PAIRS = [(f"What is {a} plus {b}?", f"The sum is {a + b}.") for a in range(1, 5) for b in range(1, 4)]


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(record) + "\n" for record in records))
    return path


def task_for(files: str, *overrides: str, template: str | None = None):
    cfg = compose_config(
        "model=tiny_llama",
        "task=prompt_response",
        f"task.data_files={files}",
        *overrides,
        config_name="evaluate",
    )
    tokenizer = models.build_tokenizer(cfg.model)
    tokenizer.chat_template = template
    return datamodules.build_task(cfg, tokenizer)


@pytest.mark.parametrize("layout", ["parquet", "renamed_jsonl"])
def test_trains_and_evaluates_on_a_users_file(layout: str, tiny_config, tmp_path: Path) -> None:
    if layout == "parquet":
        path, columns = tmp_path / "qa.parquet", []
        table = pyarrow.table({"prompt": [q for q, _ in PAIRS], "response": [a for _, a in PAIRS]})
        pyarrow.parquet.write_table(table, path)
    else:
        path = write_jsonl(tmp_path / "qa.jsonl", [{"q": q, "a": a} for q, a in PAIRS])
        columns = ["task.columns.prompt=q", "task.columns.response=a"]
    mapped = ["task=prompt_response", f"task.data_files={path}", "task.answer_pattern='is (\\d+)'", *columns]
    run = train(tiny_config("model=tiny_llama", *mapped, "data.max_train_samples=8", "data.val_size=2"))
    task = datamodules.build_task(
        compose_config(*mapped, "model=tiny_llama"),
        models.build_tokenizer(compose_config("model=tiny_llama").model),
    )
    example = task.tokenize_record(task.records("train")[0])
    supervised = task.tokenizer.decode([t for t in example["labels"] if t != IGNORE_INDEX])
    assert supervised.endswith("</s>") and supervised.removesuffix("</s>") in dict(PAIRS).values()

    cfg = compose_config(
        "model=tiny_llama",
        *mapped,
        f"ckpt={run['run_dir']}",
        "generation.max_new_tokens=6",
        "limit=4",
        config_name="evaluate",
    )
    with open_dict(cfg):
        cfg.paths.output_dir = str(tmp_path / "eval")
    results = evaluate.run(cfg)
    rows = [json.loads(line) for line in (tmp_path / "eval" / "predictions.jsonl").read_text().splitlines()]
    assert [row["gold"] for row in rows] == [a for _, a in PAIRS[:4]]
    for row, (question, _) in zip(rows, PAIRS, strict=False):
        assert row["prompt"] == question + "\n"
        assert row["exact_match_answer"] == float(row["extracted_answer"] == task.extracted(row["gold"]))
    interval = results["intervals"]["pass@1_answer"]
    assert results["stage"] == "sft" and interval["n"] == 4 and interval["method"]


def test_answer_extraction_rouge_and_bleu(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "qa.jsonl", [{"prompt": q, "response": a} for q, a in PAIRS])
    task = task_for(str(path), "task.answer_pattern='is (\\d+)'")
    assert task.score("so the sum is 7 ok", "The sum is 7.")["exact_match_answer"] == 1.0
    assert task.score("so it is 8", "The sum is 7.") == {"extracted_answer": "8", "exact_match_answer": 0.0}
    assert task_for(str(path)).score(" the sum is 7. ", "The sum is 7.")["exact_match_answer"] == 1.0
    assert task_for(str(path), "task.metric=rouge_l").score("the sum is 7", "The sum is 7.") == {
        "rouge_l": 1.0
    }
    bleu = task_for(str(path), "task.metric=bleu").score("so the sum is 7 then", "The sum is 7 then")["bleu"]
    assert 0 < bleu < 1


def test_a_chat_column_trains_on_its_last_assistant_turn_only(tmp_path: Path) -> None:
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello."},
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "4"},
    ]
    path = write_jsonl(tmp_path / "chat.jsonl", [{"conversation": messages}] * 4)
    overrides = ("task.columns.messages=conversation", "prompt.chat_template=true")
    task = task_for(f"{{train: {path}, test: {path}}}", *overrides, template=CHATML)
    record = task.records("test")[0]
    example = task.tokenize_record(record)
    assert task.tokenizer.decode([t for t in example["labels"] if t != IGNORE_INDEX]) == "4<|im_end|>\n"
    prompt = task.prompt_format.prompt(record, [])
    assert prompt.startswith("<|im_start|>system\nBe brief.") and prompt.endswith(
        "2+2?<|im_end|>\n<|im_start|>assistant\n"
    )
    assert task.reference(record) == "4"


@pytest.mark.parametrize(
    ("records", "overrides", "message"),
    [
        ([{"question": "Q", "response": "A"}], [], r"qa.jsonl:1: no column 'prompt' \(task.columns.prompt\)"),
        (
            [{"prompt": "Q", "response": "A"}, {"prompt": "Q", "response": "  "}],
            [],
            r"qa.jsonl:2: column 'response' \(task.columns.response\) is empty or not text",
        ),
        (
            [{"chat": [{"role": "user", "content": "Q"}]}],
            ["task.columns.messages=chat"],
            r"qa.jsonl:1: column 'chat' \(task.columns.messages\) must end in a non-empty assistant turn",
        ),
        (
            [{"chat": [{"role": "teacher", "content": "Q"}]}],
            ["task.columns.messages=chat"],
            r"qa.jsonl:1: column 'chat' \(task.columns.messages\) must be a list of \{role: system\|user",
        ),
    ],
)
def test_a_bad_mapping_names_the_file_line_and_column(tmp_path: Path, records, overrides, message) -> None:
    path = write_jsonl(tmp_path / "qa.jsonl", records)
    with pytest.raises(DataSourceError, match=message):
        task_for(f"{{train: {path}, test: {path}}}", *overrides).records("test")


def test_a_mapping_without_prompt_and_response_or_messages_is_refused() -> None:
    with pytest.raises(ValueError, match="task.columns: map `messages`"):
        task_for("unused.jsonl", "task.columns.prompt=null")
