"""Resumable evaluation: each item's outputs (its completions, its class scores) are appended to the run dir
as soon as they are done (`finished/rank<r>.jsonl`, one JSON line per item, flushed to disk), and a later run
of the same evaluation computes only the items missing there.

The evaluation's identity (`evaluation_key.json`: the model and its weights' files, the task, the prompt and
generation settings, the items) is written first. `resume=<run dir>` continues that run, refused with the
differing keys named when its identity is not this run's; `resume=auto` (the default) continues the newest
unfinished run beside this one (the same command's earlier run dir) with the same identity, if there is one. A
line cut off by a kill is not read. Once predictions.jsonl is written the journal is removed."""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from runtime.results import RESULTS_FILE
from runtime.saved_run import RunModel

log = logging.getLogger(__name__)

JOURNAL_DIR = "finished"
KEY_FILE = "evaluation_key.json"
# model keys that place or load the weights without changing what they compute
PLACEMENT_KEYS = ("device_map", "max_memory", "offload_folder")
# generation keys that change how fast outputs come, not what they are
SPEED_KEYS = ("prefix_cache", "backend", "vllm")


def identity(cfg: DictConfig, choice: RunModel) -> dict[str, Any]:
    """What an evaluation's outputs depend on: the model config, the weight files of its export (name, size,
    modification time), the task, data, prompt and generation settings, the items and the seed."""
    resolved = OmegaConf.to_container(cfg, resolve=True)
    model = {k: v for k, v in resolved["model"].items() if k not in PLACEMENT_KEYS}
    generation = {k: v for k, v in (resolved.get("generation") or {}).items() if k not in SPEED_KEYS}
    weights = None
    if choice.export is not None:
        files = sorted(p for p in Path(choice.export).rglob("*") if p.is_file())
        weights = {str(p.relative_to(choice.export)): [p.stat().st_size, p.stat().st_mtime_ns] for p in files}
    key = {
        "model": model,
        "ckpt": str(choice.export) if choice.export is not None else None,
        "weights": weights,
        "task": resolved["task"],
        "data": resolved.get("data"),
        "prompt": resolved.get("prompt"),
        "generation": generation,
        "limit": resolved.get("limit"),
        "seed": resolved.get("seed"),
    }
    return json.loads(json.dumps(key))  # as it reads back from the file


def differences(first: Mapping[str, Any], second: Mapping[str, Any], prefix: str = "") -> list[str]:
    """The dotted keys whose values differ between two identities, with both values."""
    found = []
    for key in sorted(set(first) | set(second)):
        a, b = first.get(key), second.get(key)
        if isinstance(a, Mapping) and isinstance(b, Mapping) and key != "weights":
            found += differences(a, b, f"{prefix}{key}.")
        elif a != b:
            found.append(
                f"{prefix}{key} ({'changed files' if key == 'weights' else f'{a!r} there, {b!r} here'})"
            )
    return found


def read(run_dir: Path) -> dict[int, Any]:
    """The outputs of every finished item recorded in `run_dir`, by item index (a cut-off last line is
    skipped)."""
    finished = {}
    for path in sorted((Path(run_dir) / JOURNAL_DIR).glob("*.jsonl")):
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                entry = json.loads(line)
            except json.JSONDecodeError:
                continue  # the line a kill cut off
            finished[entry["item"]] = entry["output"]
    return finished


def start(cfg: DictConfig, choice: RunModel, run_dir: Path) -> dict[int, Any]:
    """Write this evaluation's identity to `run_dir` and carry over the finished items of the run it resumes
    (`resume`), returned by item index; none for a fresh run."""
    key = identity(cfg, choice)
    run_dir = Path(run_dir)
    (run_dir / KEY_FILE).write_text(json.dumps(key, indent=1) + "\n")
    source = _resumed(cfg.get("resume", "auto"), key, run_dir)
    if source is None:
        return {}
    finished = read(source)
    directory = run_dir / JOURNAL_DIR
    directory.mkdir(exist_ok=True)
    with (directory / "resumed.jsonl").open("w", encoding="utf-8") as handle:
        handle.writelines(json.dumps({"item": i, "output": o}) + "\n" for i, o in sorted(finished.items()))
    log.info("resuming %s: %d items finished there", source, len(finished))
    return finished


def _resumed(resume: str | None, key: dict[str, Any], run_dir: Path) -> Path | None:
    """The run dir this run continues: `resume` when it names one (refused unless its identity is `key`), the
    newest unfinished run beside `run_dir` with identity `key` when it is `auto`, else none."""
    if resume in (None, "none", False):
        return None
    if resume != "auto":
        source = Path(resume)
        if not (source / KEY_FILE).exists():
            raise FileNotFoundError(f"resume={resume}: no {KEY_FILE} there; is it an evaluate.py run dir?")
        differ = differences(json.loads((source / KEY_FILE).read_text()), key)
        if differ:
            raise ValueError(
                f"resume={resume}: that evaluation differs from this one in " + "; ".join(differ)
            )
        return source
    candidates = [
        path
        for path in run_dir.parent.iterdir()
        if path != run_dir
        and (path / JOURNAL_DIR).is_dir()
        and not (path / RESULTS_FILE).exists()
        and (path / KEY_FILE).exists()
        and json.loads((path / KEY_FILE).read_text()) == key
    ]
    return max(candidates, key=lambda path: path.stat().st_mtime_ns, default=None)


class Journal:
    """The items one evaluation process finishes, appended to `finished/rank<rank>.jsonl` as they finish."""

    def __init__(self, run_dir: Path, rank: int = 0) -> None:
        directory = Path(run_dir) / JOURNAL_DIR
        directory.mkdir(parents=True, exist_ok=True)
        self.handle = (directory / f"rank{rank}.jsonl").open("a", encoding="utf-8")

    def __call__(self, item: int, output: Any) -> None:
        """Record item `item`'s output, on disk before this returns."""
        self.handle.write(json.dumps({"item": item, "output": output}) + "\n")
        self.handle.flush()
        os.fsync(self.handle.fileno())

    def close(self) -> None:
        self.handle.close()


def remove(run_dir: Path) -> None:
    """Drop the journal of a run whose predictions are written."""
    shutil.rmtree(Path(run_dir) / JOURNAL_DIR, ignore_errors=True)
