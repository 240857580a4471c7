"""Evaluation split across processes (`evaluate.py devices=N`): each process loads the model on its own device
and computes the outputs of one contiguous share of the items (completions, class scores); the first process
is the evaluate.py run itself, which gathers the shares in item order and scores them as one run would.

Each share is cut at a multiple of the scorer's batch (`generation.batch_size`, `data.eval_batch_size`) (at
single items when there are fewer batches than processes), so a one-process run meets the same batches as far
as batching by position goes. The shares come back through JSON files in the run dir (`shards/`), read once
every process has exited: a process that fails stops the run with its exit code and share, nothing waits on a
collective that will never complete. On CPU the cores are split between the processes."""

from __future__ import annotations

import json
import logging
import math
import multiprocessing
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from transformers import set_seed

import datamodules
from datamodules.task import Task
from evaluation.journal import Journal
from evaluation.loaded import Loaded, load
from runtime.saved_run import RunModel

log = logging.getLogger(__name__)

SHARDS_DIR = "shards"

# outputs(cfg, loaded, task, records, share, on_finished) -> one JSON value per item of `share` (record
# indices), each also handed to on_finished(index, value) as soon as it is done
Outputs = Callable[
    [DictConfig, Loaded, Task, list[dict[str, Any]], list[int], Callable[[int, Any], None]], list[Any]
]


def shares(count: int, world: int, unit: int) -> list[range]:
    """`count` items cut into `world` contiguous ranges, as even as they can be: of whole `unit`s where every
    range gets one, else of single items (fewer items than ranges: the last ranges are empty)."""
    unit = unit if count >= world * unit else 1
    units = math.ceil(count / unit)
    bounds = [min(count, unit * (units * rank // world)) for rank in range(world + 1)]
    return [range(start, end) for start, end in zip(bounds[:-1], bounds[1:], strict=True)]


def gathered(
    cfg: DictConfig,
    outputs: Outputs,
    unit: int,
    loaded: Loaded,
    task: Task,
    records: list,
    run_dir: Path,
    finished: dict[int, Any],
) -> list[Any]:
    """`outputs` for every record, in record order: those `finished` before as they are, the others computed
    by `devices` processes (this one first), each share of them cut at a multiple of `unit` (the scorer's
    batch), every item recorded in the run's journal (evaluation/journal.py) as it is done."""
    world = cfg.get("devices", 1)  # checked with the run's config (runtime/validate.py)
    pending = [index for index in range(len(records)) if index not in finished]
    if world == 1 or len(pending) <= 1:
        journal = Journal(run_dir)
        try:
            computed = outputs(cfg, loaded, task, records, pending, journal) if pending else []
        finally:
            journal.close()
        return _in_order(finished, pending, computed, len(records))
    parts = [[pending[j] for j in part] for part in shares(len(pending), world, unit) if part]
    directory = run_dir / SHARDS_DIR
    directory.mkdir(parents=True, exist_ok=True)
    resolved = OmegaConf.to_container(cfg, resolve=True)
    context = multiprocessing.get_context("spawn")
    workers = [
        context.Process(
            target=_work,
            args=(
                outputs,
                resolved,
                loaded.choice,
                records,
                rank,
                parts[rank],
                directory,
                _threads_each(len(parts)),
            ),
        )
        for rank in range(1, len(parts))
    ]
    for worker in workers:
        worker.start()
    threads = torch.get_num_threads()
    journal = Journal(run_dir)
    try:
        torch.set_num_threads(_threads_each(len(parts)))
        mine = outputs(cfg, loaded, task, records, parts[0], journal)
    finally:
        torch.set_num_threads(threads)
        journal.close()
    for worker in workers:
        worker.join()
    failed = [(rank, w.exitcode) for rank, w in enumerate(workers, start=1) if w.exitcode != 0]
    if failed:
        raise RuntimeError(
            "evaluation processes failed (rank, exit code): "
            + ", ".join(
                f"{rank} ({code}) on items {parts[rank][0]}..{parts[rank][-1]}" for rank, code in failed
            )
            + "; their errors are in the log above"
        )
    computed = list(mine)
    for rank in range(1, len(parts)):
        computed += json.loads((directory / f"rank{rank}.json").read_text())
    shutil.rmtree(directory)
    log.info("%d items scored by %d processes (shares %s)", len(pending), len(parts), [len(p) for p in parts])
    return _in_order(finished, [i for part in parts for i in part], computed, len(records))


def _in_order(finished: dict[int, Any], indices: list[int], computed: list[Any], count: int) -> list[Any]:
    """Every item's output in item order, from those finished before and those just computed."""
    outputs = {**finished, **dict(zip(indices, computed, strict=True))}
    return [outputs[index] for index in range(count)]


def _threads_each(world: int) -> int:
    return max(1, (os.cpu_count() or 1) // world)


def _work(
    outputs: Outputs,
    resolved: dict,
    choice: RunModel,
    records: list,
    rank: int,
    share: list[int],
    directory: Path,
    threads: int,
) -> None:
    """One evaluation process: load the model on its device, compute its share (each item journalled as it
    is done), write it as JSON."""
    torch.set_num_threads(threads)
    cfg = OmegaConf.create(resolved)
    set_seed(cfg.seed)  # as the first process built the model (from_scratch)
    loaded = load(choice, cfg, rank)
    set_seed(cfg.seed + rank)  # sampling: one stream per process
    task = datamodules.build_task(cfg, loaded.tokenizer)
    journal = Journal(directory.parent, rank)
    try:
        result = outputs(cfg, loaded, task, records, share, journal)
    finally:
        journal.close()
    (directory / f"rank{rank}.json").write_text(json.dumps(result))
