"""Write a task's data from the Hugging Face hub to local files, once, for runs that read `task.data_files`.

    python -m datamodules.download gsm8k --out data/          #
    data/gsm8k/{train,test,train_socratic,test_socratic}.jsonl python -m datamodules.download hotpotqa --out
    data/       # data/hotpotqa/hotpot_dev_distractor.json python -m datamodules.download ag_news --out data/
    # data/ag_news/{train,test}.jsonl python -m datamodules.download cosmopedia --out data/     #
    data/cosmopedia/train.jsonl (first 20,000 documents)

Reads through `datasets` (datamodules/sources.py), so it needs the hub; on a machine without it the error says
so, and the files can be written on another machine and copied. The files are in the formats the tasks read.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import NamedTuple

from datamodules.sources import DataSourceError, read_hub


class HubSplit(NamedTuple):
    """One file to write: a split of a hub dataset (a corpus is streamed, and only its first `limit` records
    kept unless --max-records says otherwise)."""

    hub_id: str
    config: str | None
    split: str
    file: str
    streaming: bool = False
    limit: int | None = None


DATASETS: dict[str, list[HubSplit]] = {
    "gsm8k": [
        HubSplit("openai/gsm8k", "main", "train", "train.jsonl"),
        HubSplit("openai/gsm8k", "main", "test", "test.jsonl"),
        HubSplit("openai/gsm8k", "socratic", "train", "train_socratic.jsonl"),
        HubSplit("openai/gsm8k", "socratic", "test", "test_socratic.jsonl"),
    ],
    "hotpotqa": [HubSplit("hotpotqa/hotpot_qa", "distractor", "validation", "hotpot_dev_distractor.json")],
    "ag_news": [
        HubSplit("fancyzhx/ag_news", None, "train", "train.jsonl"),
        HubSplit("fancyzhx/ag_news", None, "test", "test.jsonl"),
    ],
    "cosmopedia": [
        HubSplit("HuggingFaceTB/smollm-corpus", "cosmopedia-v2", "train", "train.jsonl", True, 20000)
    ],
}


def download(name: str, out: Path, max_records: int | None = None) -> list[Path]:
    """Write every file of dataset `name` under `out/<name>/` (only the first `max_records` records of each
    split when given); return the paths written."""
    if name not in DATASETS:
        raise DataSourceError(f"unknown dataset {name!r}; one of {', '.join(DATASETS)}")
    written = []
    for item in DATASETS[name]:
        limit = max_records if max_records is not None else item.limit
        records = read_hub(item.hub_id, item.config, item.split, item.streaming, limit)
        records = [{k: v for k, v in record.items() if k != "_where"} for record in records]
        path = out / name / item.file
        path.parent.mkdir(parents=True, exist_ok=True)
        staging = path.with_name(f".{path.name}.{os.getpid()}.partial")
        if path.suffix == ".json":
            staging.write_text(json.dumps(records, ensure_ascii=False) + "\n", encoding="utf-8")
        else:
            staging.write_text(
                "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8"
            )
        os.replace(staging, path)
        print(f"{path}: {len(records)} records from {item.hub_id} ({item.config}, {item.split})")
        written.append(path)
    return written


def main(argv: list[str] | None = None) -> None:
    """Command line: `python -m datamodules.download <dataset> --out <dir> [--max-records N]`."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("dataset", choices=sorted(DATASETS))
    parser.add_argument("--out", type=Path, default=Path("data"))
    parser.add_argument("--max-records", type=int, default=None, help="the first N records of each split")
    args = parser.parse_args(argv)
    try:
        download(args.dataset, args.out, args.max_records)
    except DataSourceError as error:
        sys.exit(f"datamodules.download: {error}")


if __name__ == "__main__":
    main()
