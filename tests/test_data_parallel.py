"""Data-parallel evaluation (evaluation/data_parallel.py): `devices=2` on two CPU processes writes the same
per-item outputs, in the same order, and the same metrics as one process, for generation and for
classification scoring; a `-m` grid runs every job that way; the shares are whole batches; a process that
fails stops the run by name; bad settings are refused by key."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
from omegaconf import open_dict

from evaluation import evaluate
from evaluation.data_parallel import gathered, shares
from evaluation.loaded import Loaded
from runtime import saved_run
from runtime.validate import ConfigError, check
from tests.conftest import compose_config, launch

EVAL_TINY = ["model=tiny_llama", "task.source=bundled", "print_config=false", "generation.max_new_tokens=8"]


def evaluated(tmp_path: Path, devices: int, *overrides: str) -> tuple[list[dict], dict]:
    """predictions.jsonl rows and metrics.json of one evaluate run with `devices` processes."""
    cfg = compose_config(*EVAL_TINY, f"devices={devices}", *overrides, config_name="evaluate")
    run_dir = tmp_path / f"devices{devices}"
    with open_dict(cfg):
        cfg.paths.output_dir = str(run_dir)
    evaluate.run(cfg)
    rows = [json.loads(line) for line in (run_dir / "predictions.jsonl").read_text().splitlines()]
    assert not (run_dir / "shards").exists()  # the shares were read back and removed
    return rows, json.loads((run_dir / "metrics.json").read_text())


def test_shares_are_contiguous_whole_batches_covering_every_item() -> None:
    assert shares(10, 2, 3) == [range(0, 6), range(6, 10)]  # 4 batches of 3: two each
    assert shares(7, 3, 2) == [range(0, 2), range(2, 4), range(4, 7)]
    assert shares(3, 2, 8) == [range(0, 1), range(1, 3)]  # fewer batches than ranks: single items
    assert shares(2, 4, 8) == [range(0, 0), range(0, 1), range(1, 1), range(1, 2)]  # fewer items than ranks
    for count, world, unit in ((1319, 8, 8), (5, 2, 1), (100, 3, 7)):
        parts = shares(count, world, unit)
        assert [i for part in parts for i in part] == list(range(count))
        assert all(part.start % unit == 0 for part in parts if len(part))


@pytest.mark.xdist_group("processes")  # starts a second evaluation process
@pytest.mark.parametrize(
    "overrides",
    [
        ("task=gsm8k", "limit=7", "generation.batch_size=2"),
        ("task=classification", "limit=9", "data.eval_batch_size=3"),
    ],
    ids=["generation", "classification"],
)
def test_two_processes_write_what_one_writes(tmp_path: Path, overrides: tuple[str, ...]) -> None:
    one_rows, one_metrics = evaluated(tmp_path, 1, *overrides)
    two_rows, two_metrics = evaluated(tmp_path, 2, *overrides)
    assert [r["item_id"] for r in two_rows] == [r["item_id"] for r in one_rows]  # item order
    assert two_rows == one_rows and two_metrics == one_metrics
    outputs = [r.get("generation", r.get("scores")) for r in one_rows]
    assert len({json.dumps(o) for o in outputs}) > 1  # the items differ: the order is tested


def test_bad_device_settings_are_refused_by_key(tmp_path: Path) -> None:
    cfg = compose_config(*EVAL_TINY, "devices=0", config_name="evaluate")
    with pytest.raises(ConfigError, match=r"devices=0: .*positive integer"):
        check(cfg, "evaluate")
    cfg = compose_config(*EVAL_TINY, "devices=2", "+model.device_map=auto", config_name="evaluate")
    with pytest.raises(ConfigError, match=r"devices=2 with model.device_map=auto: .*devices=1"):
        check(cfg, "evaluate")
    check(compose_config(*EVAL_TINY, "devices=2", "accelerator=cpu", config_name="evaluate"), "evaluate")
    cfg = compose_config(*EVAL_TINY, "accelerator=tpu", config_name="evaluate")
    with open_dict(cfg):
        cfg.paths.output_dir = str(tmp_path)
    with pytest.raises(ConfigError, match=r"accelerator='tpu': auto, cpu or cuda"):
        evaluate.run(cfg)
    assert not (tmp_path / "config.yaml").exists()  # refused before the run dir is written


def fails_after_the_first_share(cfg, loaded, task, records, share: list[int], on_finished) -> list:
    """Outputs that the first share gets and every later share fails on (a process that dies)."""
    if share[0]:
        raise RuntimeError(f"share from {share[0]} failed")
    return [[""] for _ in share]


@pytest.mark.xdist_group("processes")  # starts a second evaluation process
def test_a_failed_process_stops_the_run_naming_its_rank_and_items(tmp_path: Path) -> None:
    cfg = compose_config(*EVAL_TINY, "devices=2", "generation.batch_size=2", config_name="evaluate")
    with open_dict(cfg):
        cfg.paths.output_dir = str(tmp_path)
    records = [{"question": str(i), "answer": "#### 1"} for i in range(4)]
    with pytest.raises(RuntimeError, match=r"rank, exit code\): 1 \(1\) on items 2\.\.3"):
        loaded = Loaded(None, None, None, saved_run.resolve(cfg))
        gathered(cfg, fails_after_the_first_share, 2, loaded, None, records, tmp_path, {})


@pytest.mark.xdist_group("processes")  # each job starts a second evaluation process
def test_a_grid_runs_every_job_data_parallel_and_writes_its_table(tmp_path: Path) -> None:
    result = launch(
        "evaluate.py",
        "-m",
        "task=gsm8k,gsm8k_inf",
        "devices=2",
        *EVAL_TINY,
        "limit=3",
        "generation.max_new_tokens=4",
        f"hydra.sweep.dir={tmp_path}",
    )
    assert (result.stdout + result.stderr).count("3 items scored by 2 processes") == 2
    with (tmp_path / "zero_shot_performance.csv").open() as handle:
        assert sorted(row["dataset"] for row in csv.DictReader(handle)) == ["gsm8k", "gsm8k_inf"]
