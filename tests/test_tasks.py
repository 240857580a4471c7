"""Classification and Socratic-math tasks: readers, label scoring, teacher-turn masking, text metrics."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import open_dict

import datamodules
from datamodules import IGNORE_INDEX
from datamodules.base import TextDataModule
from datamodules.chat import ChatStyle
from datamodules.dialogues import dialogues_of, gsm8k_dialogue
from datamodules.sources import DataSourceError, read_file
from datamodules.task import Task
from datamodules.text_metrics import text_tokens
from evaluation import evaluate
from modeling import models
from modeling.log_probs import label_logprobs
from modeling.models import CHATML
from runtime.validate import ConfigError, check_config
from tests.conftest import compose_config, launch

SOCRATIC_GSM8K = {
    "question": "Ann has 3 bags of 4 apples. She eats 2. How many are left?",
    "answer": "How many apples does Ann have? ** Ann has 3 * 4 = <<3*4=12>>12 apples.\n"
    "How many are left? ** 12 - 2 = <<12-2=10>>10 apples are left.\n#### 10",
}


def built_task(name: str, *overrides: str) -> Task:
    cfg = compose_config("model=tiny_llama", f"task={name}", "task.source=bundled", *overrides)
    _, tokenizer = models.build(cfg.model)
    return datamodules.build_task(cfg, tokenizer)


def test_label_scores_sum_every_token_of_each_label() -> None:
    torch.manual_seed(0)
    model, tokenizer = models.build(compose_config("model=tiny_llama").model)
    model.eval()
    prompts = [tokenizer("Text: rain again\nLabel:")["input_ids"], tokenizer("Hi")["input_ids"]]
    labels = [
        tokenizer(" Sci/Tech", add_special_tokens=False)["input_ids"],
        tokenizer(" Sports", add_special_tokens=False)["input_ids"],
    ]
    assert labels[0][:2] == labels[1][:2]  # " S...": the first tokens alone cannot tell them apart
    scores = label_logprobs(model, prompts, labels, tokenizer.pad_token_id)
    for p, prompt in enumerate(prompts):
        for c, label in enumerate(labels):
            logprobs = model(input_ids=torch.tensor([prompt + label])).logits[0].log_softmax(-1)
            expected = sum(logprobs[len(prompt) - 1 + i, token] for i, token in enumerate(label))
            assert scores[p, c].item() == pytest.approx(expected.item(), abs=1e-4)


def test_classification_labels_may_be_names_or_ids_and_bad_labels_name_the_record(tmp_path: Path) -> None:
    data = built_task("classification")
    assert data.class_index({"text": "x", "label": "Sci/Tech"}) == 3
    assert data.class_index({"text": "x", "label": 1}) == data.class_index({"text": "x", "label": "1"}) == 1
    (tmp_path / "bad.csv").write_text("text,label\nfine,World\nbroken,Weather\n")
    with pytest.raises(DataSourceError, match=r"bad.csv:3: label 'Weather'.*task.label_column='label'"):
        [data.class_index(record) for record in read_file(tmp_path / "bad.csv")]


def test_classification_batches_carry_the_class_and_the_prompt_length() -> None:
    data = built_task("classification")
    batches = TextDataModule(data)
    batches.setup("fit")
    batch = next(iter(batches.train_dataloader()))
    for row in range(len(batch["input_ids"])):
        length = int(batch["prompt_length"][row])
        assert (batch["labels"][row, :length] == IGNORE_INDEX).all() and batch["labels"][
            row, length
        ] != IGNORE_INDEX
        label = data.tokenizer.decode(
            [t for t in batch["labels"][row].tolist() if t != IGNORE_INDEX], skip_special_tokens=True
        )
        assert label == " " + data.class_names[int(batch["class_index"][row])]


def test_projection_head_needs_a_task_that_offers_the_classifier() -> None:
    with pytest.raises(ConfigError, match=r"'classifier' module, which task 'gsm8k' does not offer"):
        check_config(compose_config("method=projection_head", "task=gsm8k"))
    check_config(compose_config("method=projection_head", "task=classification"))


@pytest.mark.parametrize("template", [None, CHATML])
def test_loss_covers_exactly_the_teacher_turns(template: str | None) -> None:
    data = built_task("socratic_math", "data.max_length=4096")  # byte-level tokens: keep the whole dialogue
    data.tokenizer.chat_template = template
    data.chat_style = ChatStyle() if template else None  # prompt.chat_template=true / false
    dialogue = data.records("train")[0]
    example = data.tokenize_record(dialogue)
    supervised = data.tokenizer.decode([t for t in example["labels"] if t != IGNORE_INDEX])
    teacher = [m["content"] for m in dialogue["messages"] if m["role"] == "assistant"]
    end = "<|im_end|>\n" if template else "\n"
    assert supervised == "".join((c if template else " " + c) + end for c in teacher)
    whole = data.tokenizer.decode(example["input_ids"], skip_special_tokens=True)
    assert whole == data.render(dialogue["messages"])
    assert all(m["content"] in whole for m in dialogue["messages"])


def test_three_dialogue_formats_are_read(tmp_path: Path) -> None:
    socrateach = {
        "p7": {
            "question": "What is 2 + 5?",
            "answer": "7",
            "analysis": "...",
            "steps": ["add"],
            "dialogues": {
                "p7_0": [
                    {"system": "What do you get if you add?", "user": "7"},
                    {"system": "Right, 7.", "END": True},
                ]
            },
        }
    }
    (tmp_path / "socrateach.json").write_text(json.dumps(socrateach))
    [record] = read_file(tmp_path / "socrateach.json")
    [dialogue] = dialogues_of(record)
    assert [m["role"] for m in dialogue["messages"]] == ["user", "assistant", "user", "assistant"]
    assert dialogue["answer"] == "7" and dialogue["id"] == "p7/p7_0"

    converted = gsm8k_dialogue(SOCRATIC_GSM8K["question"], SOCRATIC_GSM8K["answer"])
    assert [m["content"] for m in converted["messages"] if m["role"] == "assistant"] == [
        "How many apples does Ann have?",
        "How many are left?",
        "Well done! So the answer is 10.",
    ]
    assert "Ann has 3 * 4 = 12 apples." in [
        m["content"] for m in converted["messages"]
    ]  # calculator notes gone

    [socraticmath] = dialogues_of(
        {"id": "s1", "conversations": [{"from": "user", "value": "q"}, {"from": "assistant", "value": "a"}]}
    )
    assert socraticmath["messages"][1] == {"role": "assistant", "content": "a"}
    with pytest.raises(DataSourceError, match=r"f.jsonl:4: not a tutoring dialogue"):
        dialogues_of({"text": "hello", "_where": "f.jsonl:4"})


def test_converter_writes_socraticmath_json_that_reads_back(tmp_path: Path) -> None:
    (tmp_path / "socratic.jsonl").write_text(json.dumps(SOCRATIC_GSM8K) + "\n")
    launch(
        "-m",
        "datamodules.socratic",
        "--input",
        str(tmp_path / "socratic.jsonl"),
        "--output",
        str(tmp_path / "out.json"),
    )
    [record] = read_file(tmp_path / "out.json")
    assert (
        dialogues_of(record)[0]["messages"]
        == gsm8k_dialogue(SOCRATIC_GSM8K["question"], SOCRATIC_GSM8K["answer"])["messages"]
    )


def test_chinese_text_metrics_use_characters() -> None:
    generated, reference = "每人分到4个苹果", "所以每人分到4个苹果"
    assert text_tokens(generated, "13a") == ["每人分到4个苹果"]  # whitespace words: one token, no overlap
    assert text_tokens(generated, "zh")[:3] == ["每", "人", "分"]
    data = built_task("socratic_math")
    answer = {"turn": reference, "answer": None}
    chinese = data.score(generated, answer)
    data.tokenize_mode = "13a"
    assert data.score(generated, answer)["rouge_l"] == 0.0 < 0.8 < chinese["rouge_l"]
    assert chinese["bleu"] > 0


@pytest.mark.parametrize(("turns", "count"), [("last", 3), ("all", 7)])
def test_socratic_evaluation_scores_generated_teacher_turns(tmp_path: Path, turns: str, count: int) -> None:
    cfg = compose_config(
        "model=tiny_llama",
        "task=socratic_math",
        "task.source=bundled",
        f"task.eval_turns={turns}",
        "generation.max_new_tokens=8",
        "print_config=false",
        config_name="evaluate",
    )
    with open_dict(cfg):
        cfg.paths.output_dir = str(tmp_path)
    metrics = evaluate.run(cfg)["metrics"]
    rows = [json.loads(line) for line in (tmp_path / "predictions.jsonl").read_text().splitlines()]
    assert metrics["num_problems"] == len(rows) == count
    assert rows[0]["prompt"].endswith("Teacher:") and rows[0]["prompt"].startswith(
        "System: You are a Socratic"
    )
    finals = [r["answer_correct"] for r in rows if r["answer_correct"] is not None]
    assert len(finals) == 3  # one final teacher turn per test dialogue
    assert metrics["answer_correct"] == pytest.approx(sum(finals) / 3)
    assert {"bleu", "rouge_l", "corpus_bleu", "corpus_rouge_l"} <= set(metrics)


def test_socratic_settings_compose_on_a_tiny_model() -> None:
    paper = compose_config("experiment=socratic_math", "model=tiny_qwen2")
    reproduction = compose_config("experiment=socratic_math_qvgd", "model=tiny_qwen2")
    assert (paper.method.r, list(paper.method.target_modules), paper.optim.lr, paper.trainer.max_epochs) == (
        8,
        ["q_proj", "v_proj"],
        1e-4,
        10,
    )
    assert list(reproduction.method.target_modules) == ["q_proj", "v_proj", "gate_proj", "down_proj"]
    assert (reproduction.method.alpha, reproduction.method.dropout, reproduction.optim.lr) == (16, 0.05, 3e-4)
    assert reproduction.data.batch_size * reproduction.trainer.accumulate_grad_batches == 64
    assert compose_config("experiment=socratic_math").model.hub_id == "Qwen/Qwen1.5-7B-Chat"


@pytest.mark.parametrize("tokenize", ["13a", "zh"])
def test_socratic_corpus_statistics_equal_corpus_metrics_on_any_subset(tokenize: str) -> None:
    """The per-turn decomposition that the bootstrap resamples gives the corpus BLEU and ROUGE-L that
    `corpus_metrics` computes on the same turns (repeats included, as a resample has them)."""
    data = built_task("socratic_math", "task.eval_turns=all")
    data.tokenize_mode = tokenize
    records = data.evaluation_records()
    references = [data.reference(record) for record in records]
    words = [reference["turn"].split() for reference in references]
    generations = [" ".join(w[: len(w) // 2] + ["so", "what", "next?"]) for w in words]  # partly right
    fast = data.corpus_statistics(generations, references)
    recomputed = Task.corpus_statistics(data, generations, references)  # corpus_metrics per subset
    rng = np.random.default_rng(0)
    for indices in [
        np.arange(len(records)),
        *(rng.integers(0, len(records), len(records)) for _ in range(5)),
    ]:
        for name in ("corpus_bleu", "corpus_rouge_l"):
            assert fast[name](indices) == pytest.approx(recomputed[name](indices), abs=1e-6), name
    assert fast["corpus_bleu"](np.arange(len(records))) > 0
