"""The only place that reads data: local JSONL/JSON/CSV/TXT files, a Hugging Face hub dataset, or a bundled
sample.

Every record comes back as a dict with an extra `_where` key ("file:line" or "hub_id[split][i]") so
that any later validation error can name the exact record it is about.
"""

from __future__ import annotations

import csv
import io
import itertools
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

SAMPLES_DIR = Path(__file__).parent / "samples"


class DataSourceError(ValueError):
    """Data could not be read; the message names the file, line or config key."""


def load_split(source: Mapping[str, Any], split: str, stage: str | None = None) -> list[dict[str, Any]]:
    """Records of `split` (read for `stage`: train / test) from the source a task config describes.

    `source.data_files` (a path, or a mapping from stage or split name to path) wins when set; otherwise
    `source.kind` picks `hub` (`hub_id`, `hub_config`, optionally `streaming`) or `bundled`
    (`datamodules/samples/<bundled>/<split>.jsonl`). `source.max_records` keeps only the first N.
    """
    limit = source.get("max_records")
    data_files = source.get("data_files")
    if data_files:
        path = data_files if isinstance(data_files, str) else data_files.get(stage) or data_files.get(split)
        if path is None:
            raise DataSourceError(
                f"task.data_files has no entry for '{stage or split}' (has: {sorted(data_files)}); "
                f"use keys train / test (or the split names)"
            )
        return read_file(Path(path))[:limit]
    kind = source.get("kind")
    if kind == "bundled":
        return read_file(SAMPLES_DIR / source["bundled"] / f"{split}.jsonl")[:limit]
    if kind == "hub":
        if not source.get("hub_id"):
            raise DataSourceError(
                "task.source=hub but the task names no hub dataset (task.hub_id); set "
                "task.hub_id=<dataset id> or task.data_files=<local file>"
            )
        return read_hub(
            source["hub_id"], source.get("hub_config"), split, bool(source.get("streaming")), limit
        )
    raise DataSourceError(f"task.source must be 'hub' or 'bundled' (or set task.data_files), got {kind!r}")


def read_file(path: Path) -> list[dict[str, Any]]:
    """Records of one local file, chosen by extension: .jsonl, .json, .csv, .parquet or .txt (one text per
    line)."""
    if not path.exists():
        raise DataSourceError(f"data file not found: {path}")
    readers = {
        ".jsonl": _read_jsonl,
        ".json": _read_json,
        ".csv": _read_csv,
        ".parquet": _read_parquet,
        ".txt": _read_txt,
    }
    reader = readers.get(path.suffix)
    if reader is None:
        raise DataSourceError(f"{path}: unsupported extension '{path.suffix}' (use one of {sorted(readers)})")
    records = reader(path)
    if not records:
        raise DataSourceError(
            f"{path}: the file holds no records (empty); point task.data_files at a file with data"
        )
    return records


def read_text(path: Path) -> str:
    """The UTF-8 text of `path`; bytes that are not UTF-8 raise DataSourceError naming the file and line."""
    data = path.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as error:
        line = data[: error.start].count(b"\n") + 1
        raise DataSourceError(
            f"{path}:{line}: not UTF-8 (byte {data[error.start]:#04x} at offset {error.start}); "
            "re-encode the file as UTF-8"
        ) from error


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    records = []
    for line_number, line in enumerate(read_text(path).split("\n"), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise DataSourceError(f"{path}:{line_number}: malformed JSON ({error.msg})") from error
        if not isinstance(record, dict):
            raise DataSourceError(
                f"{path}:{line_number}: expected a JSON object, got {type(record).__name__}"
            )
        records.append({**record, "_where": f"{path}:{line_number}"})
    return records


def _read_json(path: Path) -> list[dict[str, Any]]:
    try:
        data = json.loads(read_text(path))
    except json.JSONDecodeError as error:
        raise DataSourceError(f"{path}:{error.lineno}: malformed JSON ({error.msg})") from error
    if isinstance(data, dict) and isinstance(data.get("data"), list):
        data = data["data"]
    elif isinstance(data, dict) and data and all(isinstance(v, dict) for v in data.values()):  # {id: record}
        data = [{"id": key, **value} for key, value in data.items()]
    if not isinstance(data, list):
        raise DataSourceError(f"{path}: expected a JSON list of records, {{'data': [...]}} or {{id: record}}")
    return [{**record, "_where": f"{path}[{i}]"} for i, record in enumerate(data)]


def _read_csv(path: Path) -> list[dict[str, Any]]:
    rows = csv.DictReader(io.StringIO(read_text(path), newline=""))
    return [{**row, "_where": f"{path}:{i + 2}"} for i, row in enumerate(rows)]


def _read_parquet(path: Path) -> list[dict[str, Any]]:
    import pyarrow.parquet

    try:
        rows = pyarrow.parquet.read_table(path).to_pylist()
    except pyarrow.ArrowInvalid as error:
        raise DataSourceError(f"{path}: not a readable Parquet file ({error})") from error
    return [{**row, "_where": f"{path}[row {i}]"} for i, row in enumerate(rows)]


def _read_txt(path: Path) -> list[dict[str, Any]]:
    lines = read_text(path).split("\n")
    return [
        {"text": line.rstrip("\r"), "_where": f"{path}:{i}"}
        for i, line in enumerate(lines, start=1)
        if line.strip()
    ]


def read_hub(
    hub_id: str, hub_config: str | None, split: str, streaming: bool, limit: int | None
) -> list[dict[str, Any]]:
    """The first `limit` records (None: all) of a hub dataset split, through `datasets`."""
    from datasets import load_dataset

    try:
        dataset = load_dataset(hub_id, hub_config, split=split, streaming=streaming)
        records = list(itertools.islice(dataset, limit))
    except Exception as error:  # datasets raises many types for offline / missing / gated
        raise DataSourceError(
            f"could not load hub dataset '{hub_id}' (config {hub_config!r}, split {split!r}): {error}. "
            "Offline? Use task.data_files={train: /path/train.jsonl, test: /path/test.jsonl} "
            "or task.source=bundled for the bundled sample."
        ) from error
    return [{**record, "_where": f"{hub_id}[{split}][{i}]"} for i, record in enumerate(records)]
