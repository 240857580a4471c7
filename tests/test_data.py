"""Data sources, GSM8K formatting, prompt masking and seeded shuffling."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from datamodules import IGNORE_INDEX
from datamodules.base import EpochSeededSampler, TextDataModule
from datamodules.gsm8k import GSM8KTask
from datamodules.sources import DataSourceError, load_split, read_file
from modeling.models import byte_level_tokenizer
from tests.conftest import compose_config

TEMPLATE = "Question: {question}\nAnswer:"


def gsm8k_module(source: dict, **kwargs) -> GSM8KTask:
    return GSM8KTask(
        tokenizer=byte_level_tokenizer(),
        source=source,
        splits={"train": "train", "test": "test"},
        prompt_template=TEMPLATE,
        **kwargs,
    )


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_bundled_gsm8k_sample_has_40_well_formed_problems() -> None:
    records = load_split({"kind": "bundled", "bundled": "gsm8k"}, "train") + load_split(
        {"kind": "bundled", "bundled": "gsm8k"}, "test"
    )
    assert len(records) == 40
    assert len({r["question"] for r in records}) == 40
    for record in records:
        assert re.search(r"\n#### -?[0-9.]+$", record["answer"]), record["_where"]
        for expression, value in re.findall(r"<<([^=<>]+)=([^<>]+)>>", record["answer"]):
            assert abs(eval(expression) - float(value)) < 1e-9, record["_where"]  # noqa: S307 (our own data)


def test_malformed_jsonl_line_names_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "train.jsonl"
    path.write_text('{"question": "q", "answer": "a"}\n{"question": "broken"\n')
    with pytest.raises(DataSourceError, match=rf"{re.escape(str(path))}:2: malformed JSON"):
        read_file(path)


def test_record_missing_a_field_names_file_line_and_field(tmp_path: Path) -> None:
    path = write_jsonl(
        tmp_path / "train.jsonl", [{"question": "q1", "answer": "a #### 1"}, {"question": "q2"}] * 3
    )
    module = TextDataModule(gsm8k_module({"data_files": {"train": str(path), "test": str(path)}}, val_size=1))
    with pytest.raises(DataSourceError, match=rf"{re.escape(str(path))}:\d+: GSM8K record needs .*'answer'"):
        module.setup("fit")


def test_missing_data_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(DataSourceError, match="data file not found: .*nope.jsonl"):
        load_split({"data_files": str(tmp_path / "nope.jsonl")}, "train")


def test_local_data_files_take_precedence_over_the_source_kind(tmp_path: Path) -> None:
    train = write_jsonl(
        tmp_path / "train.jsonl", [{"question": f"q{i}", "answer": f"#### {i}"} for i in range(5)]
    )
    records = load_split({"kind": "hub", "hub_id": "unused", "data_files": {"train": str(train)}}, "train")
    assert [r["question"] for r in records] == [f"q{i}" for i in range(5)]
    assert records[0]["_where"] == f"{train}:1"


def test_unreachable_hub_says_how_to_load_local_files(monkeypatch: pytest.MonkeyPatch) -> None:
    import datasets

    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach the Hugging Face Hub")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(DataSourceError, match="task.data_files=.*task.source=bundled"):
        load_split({"kind": "hub", "hub_id": "openai/gsm8k", "hub_config": "main"}, "train")


def test_a_task_without_a_hub_dataset_asks_for_one_or_for_local_files() -> None:
    cfg = compose_config("task=gsm8k", "task.hub_id=null")
    with pytest.raises(DataSourceError, match="task.hub_id=<dataset id> or task.data_files=<local file>"):
        load_split(cfg.task.definition.source, "train")


def test_loss_mask_covers_exactly_the_target_tokens() -> None:
    module = gsm8k_module({"kind": "bundled", "bundled": "gsm8k"})
    record = {"question": "What is 2+3?", "answer": "2+3 = <<2+3=5>>5.\n#### 5"}
    prompt, target = module.format_example(record)
    assert prompt == "Question: What is 2+3?\nAnswer:"
    assert target == "2+3 = 5.\n#### 5"  # calculator annotation stripped
    example = module.tokenize(prompt, target)
    tokenizer = module.tokenizer
    supervised = [i for i, label in enumerate(example["labels"]) if label != IGNORE_INDEX]
    assert supervised[0] == len(tokenizer(prompt)["input_ids"])
    assert supervised == list(range(supervised[0], len(example["input_ids"])))
    labels = [example["labels"][i] for i in supervised]
    assert tokenizer.decode(labels) == target + tokenizer.eos_token


def test_a_max_length_that_cuts_off_every_target_is_an_error(tmp_path: Path) -> None:
    module = TextDataModule(gsm8k_module({"kind": "bundled", "bundled": "gsm8k"}, max_length=64, val_size=4))
    # every bundled prompt is longer than 64 bytes: nothing would train
    with pytest.raises(
        DataSourceError, match="train: data.max_length=64 cuts off the target of all 28 examples"
    ):
        module.setup("fit")


def test_collate_right_pads_and_masks_padding() -> None:
    module = gsm8k_module({"kind": "bundled", "bundled": "gsm8k"})
    batch = module.collate([module.tokenize("ab", "c"), module.tokenize("abcd", "ef")])
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape
    assert batch["attention_mask"][0].tolist() == [1, 1, 1, 1, 0, 0, 0]
    assert batch["labels"][0, -3:].tolist() == [IGNORE_INDEX] * 3
    assert batch["input_ids"][0, -1].item() == module.tokenizer.pad_token_id


def test_validation_split_is_carved_from_train_without_overlap() -> None:
    module = gsm8k_module({"kind": "bundled", "bundled": "gsm8k"}, val_size=0.25)
    train, val = module.records("train"), module.records("val")
    assert (len(train), len(val)) == (24, 8)
    assert not {r["_where"] for r in train} & {r["_where"] for r in val}


def test_too_large_validation_size_is_rejected() -> None:
    module = gsm8k_module({"kind": "bundled", "bundled": "gsm8k"}, val_size=32)
    with pytest.raises(ValueError, match="data.val_size=32"):
        module.records("train")


def test_sampler_order_depends_only_on_seed_and_epoch() -> None:
    first, again, other = (
        EpochSeededSampler(10, seed=3),
        EpochSeededSampler(10, seed=3),
        EpochSeededSampler(10, seed=3),
    )
    other.set_epoch(1)
    assert list(first) == list(again)
    assert list(first) != list(other)
    assert sorted(other) == list(range(10))


def test_sampler_shards_over_ranks_and_resumes_at_a_batch_of_its_epoch() -> None:
    ranks = [EpochSeededSampler(10, seed=3, num_replicas=2, rank=r, batch_size=2) for r in (0, 1)]
    for sampler in ranks:
        sampler.set_epoch(1)
    shards = [list(sampler) for sampler in ranks]
    assert sorted(shards[0] + shards[1]) == list(range(10)) and len(shards[0]) == len(ranks[0]) == 5
    resumed = EpochSeededSampler(
        10, seed=3, num_replicas=2, rank=1, batch_size=2, start_epoch=1, start_batch=2
    )
    assert list(resumed) == shards[1][4:]  # two batches of two already done in epoch 1
    resumed.set_epoch(2)
    ranks[1].set_epoch(2)
    assert list(resumed) == list(ranks[1])  # later epochs start at their beginning
