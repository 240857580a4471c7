"""W&B goes offline without credentials and says so once; the multirun summary table."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from runtime import loggers, wandb_offline
from runtime.results import read_results, write_results
from runtime.sweeps import summarize, write_summary


def test_wandb_without_credentials_runs_offline_and_says_so_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "absent-netrc"))
    monkeypatch.setenv("HOME", str(tmp_path))
    with caplog.at_level(logging.INFO, logger="runtime.loggers"):
        logger = loggers.wandb_logger(project="lmlab", save_dir=str(tmp_path))
    assert logger._offline is True
    assert [r.message for r in caplog.records].count(caplog.records[0].message) == 1
    assert "no credentials found" in caplog.records[0].message


@pytest.mark.parametrize("reachable", [True, False])
def test_wandb_with_a_key_goes_online_only_when_the_server_answers(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, reachable: bool
) -> None:
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setattr(loggers, "wandb_reachable", lambda: reachable)
    assert loggers.wandb_logger(project="lmlab", save_dir=str(tmp_path))._offline is not reachable


def test_summary_has_one_row_per_job_in_job_order(tmp_path: Path) -> None:
    for job, lr in [(10, 0.3), (2, 0.1)]:
        (tmp_path / str(job)).mkdir()
        write_results(
            tmp_path / str(job), {"overrides": [f"optim.lr={lr}"], "metrics": {"val/loss": lr * 10}}
        )
    write_summary(tmp_path, summarize(tmp_path))
    rows = (tmp_path / "summary.csv").read_text().splitlines()
    assert rows[0] == "job,status,overrides,val/loss,trainable_params"
    assert rows[1].startswith("2,ok,optim.lr=0.1,1.0") and rows[2].startswith("10,ok,optim.lr=0.3,3.0")
    assert read_results(tmp_path / "2")["metrics"] == {"val/loss": 1.0}


def test_an_offline_run_file_read_while_its_last_chunk_is_being_written_gives_the_records_before_it(
    tmp_path: Path,
) -> None:
    from wandb.proto import wandb_internal_pb2

    record = wandb_internal_pb2.Record()
    record.exit.exit_code = 0
    payload = record.SerializeToString()
    full = (0).to_bytes(4, "little") + len(payload).to_bytes(2, "little") + bytes([wandb_offline.FULL])
    # the next chunk's header promises 100 bytes, of which the service has written 10 so far
    partial = (0).to_bytes(4, "little") + (100).to_bytes(2, "little") + bytes([wandb_offline.FULL])
    run_file = tmp_path / "run-x.wandb"
    run_file.write_bytes(b":W&B\x00\x00\x00" + full + payload + partial + b"\xff" * 10)
    assert wandb_offline.read_run(run_file).exit_code == 0
