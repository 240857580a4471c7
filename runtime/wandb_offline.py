"""Read an offline W&B run (`wandb/offline-run-*/run-*.wandb`) without the network: its id, group, config,
summary and metrics history.

The file is W&B's LevelDB-style record log (7-byte header, 32 KiB blocks, records split into
full/first/middle/last chunks, each a `wandb_internal_pb2.Record`); this wandb version ships no reader.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

BLOCK_SIZE = 32 * 1024
CHUNK_HEADER = 7  # crc32 (4) + length (2, little endian) + chunk type (1)
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


@dataclass
class OfflineRun:
    """What an offline run file holds, as `wandb sync` would upload it."""

    run_id: str = ""
    name: str = ""
    group: str = ""
    job_type: str = ""
    tags: list[str] = field(default_factory=list)
    exit_code: int | None = None  # None: the process ended without finishing the run
    config: dict[str, Any] = field(default_factory=dict)
    summary: dict[str, Any] = field(default_factory=dict)
    history: list[dict[str, Any]] = field(default_factory=list)


def _chunks(data: bytes) -> Iterator[bytes]:
    position, pending = 7, b""
    while position + CHUNK_HEADER <= len(data):
        left_in_block = BLOCK_SIZE - position % BLOCK_SIZE
        if left_in_block < CHUNK_HEADER:
            position += left_in_block
            continue
        length = int.from_bytes(data[position + 4 : position + 6], "little")
        kind = data[position + 6]
        payload = data[position + CHUNK_HEADER : position + CHUNK_HEADER + length]
        if len(payload) < length:  # the service is still writing this chunk: read it next time
            return
        position += CHUNK_HEADER + length
        if kind == FULL:
            yield payload
        elif kind == FIRST:
            pending = payload
        elif kind == MIDDLE:
            pending += payload
        elif kind == LAST:
            yield pending + payload


def _items(items: Any) -> dict[str, Any]:
    return {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in items}


def read_run(run_file: str | Path, wait: float = 0.0) -> OfflineRun:
    """The run record, config, final summary and logged metric rows (in logging order) of an offline run file.
    `wait`: seconds to wait for the run's exit record (wandb's service process writes the file behind the
    caller, so a run read right after `wandb.finish()` in the same process may still be arriving)."""
    deadline = time.monotonic() + wait
    run = _read(run_file)
    while run.exit_code is None and time.monotonic() < deadline:
        time.sleep(0.5)
        run = _read(run_file)
    return run


def _read(run_file: str | Path) -> OfflineRun:
    from wandb.proto import wandb_internal_pb2

    data = Path(run_file).read_bytes()
    if data[:4] != b":W&B":
        raise ValueError(f"{run_file}: not a W&B run file")
    run = OfflineRun()
    for chunk in _chunks(data):
        record = wandb_internal_pb2.Record()
        record.ParseFromString(chunk)
        kind = record.WhichOneof("record_type")
        if kind == "run":  # a later run record (an update) may leave fields empty: keep what is known
            info = record.run
            run.run_id, run.name = info.run_id or run.run_id, info.display_name or run.name
            run.group, run.job_type = info.run_group or run.group, info.job_type or run.job_type
            run.tags = list(info.tags) or run.tags
        elif kind == "config":
            run.config.update(_items(record.config.update))
        elif kind == "summary":
            run.summary.update(_items(record.summary.update))
        elif kind == "exit":
            run.exit_code = record.exit.exit_code
        elif kind == "history":
            run.history.append(_items(record.history.item))
    return run


def find_run_files(run_dir: str | Path) -> list[Path]:
    """The offline W&B run files under a run directory."""
    return sorted(Path(run_dir).glob("wandb/offline-run-*/run-*.wandb"))
