"""Resumable evaluation (evaluation/journal.py): an evaluation killed with SIGKILL at random moments and run
again gives an uninterrupted run's predictions byte for byte, computing no finished item twice; a run whose
settings differ is refused by name."""

from __future__ import annotations

import json
import multiprocessing
import os
import random
import signal
import time
from pathlib import Path

import pytest
from omegaconf import open_dict

from evaluation import evaluate, journal
from runtime import saved_run
from tests.conftest import compose_config

ITEMS = 6
SETTINGS = (
    "model=tiny_llama",
    "task.source=bundled",
    "print_config=false",
    f"limit={ITEMS}",
    "generation.batch_size=2",
    "generation.max_new_tokens=48",
)


def config(run_dir: Path, *overrides: str):
    cfg = compose_config(*SETTINGS, *overrides, config_name="evaluate")
    with open_dict(cfg):
        cfg.paths.output_dir = str(run_dir)
    return cfg


def _evaluate(cfg) -> None:
    evaluate.run(cfg)


def killed(run_dir: Path, after_items: int, extra_seconds: float, *overrides: str) -> int:
    """Start the evaluation in a child process and SIGKILL it once `after_items` items are journalled and
    `extra_seconds` more have passed; the number of items it had journalled."""
    child = multiprocessing.get_context("fork").Process(target=_evaluate, args=(config(run_dir, *overrides),))
    child.start()
    deadline = time.monotonic() + 120
    while len(journal.read(run_dir)) < after_items and child.is_alive() and time.monotonic() < deadline:
        time.sleep(0.005)
    time.sleep(extra_seconds)
    os.kill(child.pid, signal.SIGKILL)
    child.join()
    assert child.exitcode == -signal.SIGKILL and not (run_dir / "predictions.jsonl").exists()
    return len(journal.read(run_dir))


@pytest.mark.xdist_group("processes")  # forks evaluations, one starts a second evaluation process
def test_a_killed_evaluation_resumes_to_the_uninterrupted_predictions(tmp_path: Path, monkeypatch) -> None:
    evaluate.run(config(tmp_path / "straight"))
    straight = (tmp_path / "straight" / "predictions.jsonl").read_bytes()
    assert not (tmp_path / "straight" / journal.JOURNAL_DIR).exists()  # removed once predictions are written
    monkeypatch.setattr(journal, "remove", lambda run_dir: None)  # keep the journals, to count what ran
    draw = random.Random(7)
    for trial, devices in enumerate((1, 1, 2)):
        parent = tmp_path / f"trial{trial}"
        before = killed(parent / "killed", draw.randint(1, ITEMS - 2), draw.uniform(0, 0.05))
        assert 0 < before < ITEMS
        # the same command again: a new run dir beside the killed one, which it finds and continues
        evaluate.run(config(parent / "again", f"devices={devices}"))
        assert (parent / "again" / "predictions.jsonl").read_bytes() == straight
        finished = parent / "again" / journal.JOURNAL_DIR
        resumed = {json.loads(line)["item"] for line in (finished / "resumed.jsonl").read_text().splitlines()}
        computed = [
            json.loads(line)["item"]
            for path in finished.glob("rank*.jsonl")
            for line in path.read_text().splitlines()
        ]
        assert len(resumed) == before and sorted(resumed | set(computed)) == list(range(ITEMS))
        assert not resumed & set(computed) and len(computed) == ITEMS - before  # nothing finished runs twice


def test_a_run_with_other_settings_is_refused_by_name(tmp_path: Path) -> None:
    earlier = tmp_path / "earlier"
    earlier.mkdir()
    journal.start(config(earlier), saved_run.resolve(config(earlier)), earlier)
    journal.Journal(earlier)(0, ["#### 1"])
    changed = ("generation.max_new_tokens=12", "prompt.system=Hi")
    with pytest.raises(ValueError, match=r"generation.max_new_tokens \(48 there, 12 here\); prompt.system"):
        evaluate.run(config(tmp_path / "later", f"resume={earlier}", *changed))
    # resume=auto continues an unfinished run beside it only where nothing differs
    for overrides, carried in ((changed, {}), ((), {0: ["#### 1"]})):
        later = tmp_path / f"later{len(overrides)}"
        later.mkdir()
        cfg = config(later, *overrides)
        assert journal.start(cfg, saved_run.resolve(cfg), later) == carried


def test_a_line_cut_off_by_a_kill_is_not_read(tmp_path: Path) -> None:
    record = journal.Journal(tmp_path)
    record(0, ["#### 1"])
    record(3, ["#### 2"])
    record.close()
    with (tmp_path / journal.JOURNAL_DIR / "rank0.jsonl").open("a") as handle:
        handle.write('{"item": 4, "outp')
    assert journal.read(tmp_path) == {0: ["#### 1"], 3: ["#### 2"]}
