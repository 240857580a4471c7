"""Trustworthy runs, the rest of them (resume: test_resume.py, checkpoints: test_checkpoints.py, saved runs:
test_exports.py): unique run dirs, bad input named before it costs anything, and W&B falling back to offline
when its server does not answer."""

from __future__ import annotations

import multiprocessing
import subprocess
import sys
import time
from pathlib import Path

import pytest
from omegaconf import open_dict

from runtime.results import read_results
from runtime.run_dir import create_unique_dir
from runtime.training import run
from runtime.validate import ConfigError
from tests.conftest import ROOT, TINY, launch

# -- run dirs
# -----------------------------------------------------------------------------------------------------


def _create(base: str, barrier, queue) -> None:
    barrier.wait()
    queue.put(create_unique_dir(base))


@pytest.mark.xdist_group("processes")  # starts several training processes: one such test at a time
def test_two_processes_asking_for_one_run_dir_at_the_same_instant_get_two(tmp_path: Path) -> None:
    context = multiprocessing.get_context("spawn")
    barrier, queue = context.Barrier(4), context.Queue()
    workers = [
        context.Process(target=_create, args=(str(tmp_path / "run"), barrier, queue)) for _ in range(4)
    ]
    for worker in workers:
        worker.start()
    created = sorted(queue.get(timeout=60) for _ in workers)
    assert created == [str(tmp_path / name) for name in ("run", "run-1", "run-2", "run-3")]


@pytest.mark.xdist_group("processes")  # starts several training processes: one such test at a time
def test_two_train_py_started_together_write_two_run_dirs(tmp_path: Path) -> None:
    command = [
        sys.executable,
        str(ROOT / "train.py"),
        *TINY,
        "model=tiny_llama",
        "trainer=debug",
        f"paths.cache_dir={tmp_path / 'cache'}",
        f"hydra.run.dir=${{unique_dir:{tmp_path}/runs/same}}",
    ]
    processes = [
        subprocess.Popen(command, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        for _ in range(2)
    ]
    assert all(p.wait(timeout=300) == 0 for p in processes)
    assert sorted(p.parent.name for p in (tmp_path / "runs").glob("*/results.json")) == ["same", "same-1"]


# -- bad input
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("data.batch_size=0", "data.batch_size=0: must be a positive integer"),
        ("data.batch_size=-2", "data.batch_size=-2: must be a positive integer"),
        (
            "+optim.lrr=1",
            "optim.lrr: unknown optimiser key; optim takes \\['lr', 'weight_decay', 'betas', "
            "'warmup_ratio'\\]",
        ),
    ],
)
def test_bad_knobs_fail_before_any_weights_load(
    tiny_config, override: str, message: str, monkeypatch
) -> None:
    from modeling import models

    monkeypatch.setattr(
        models, "build", lambda *a, **k: pytest.fail("weights loaded before the config check")
    )
    with pytest.raises(ConfigError, match=message):
        run(tiny_config("model=tiny_llama", override))


def test_max_length_shorter_than_every_prompt_is_an_error_not_an_untrained_export(
    tiny_config, tmp_path: Path
) -> None:
    with pytest.raises(
        ValueError, match="data.max_length=8 cuts off the target of all .* raise data.max_length"
    ):
        run(tiny_config("model=tiny_llama", "data.max_length=8"))
    assert not (tmp_path / "run" / "final").exists()


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def test_empty_files_and_splits_are_named(tiny_config, tmp_path: Path) -> None:
    from evaluation.evaluate import run as evaluate

    good = b'{"question": "1+1?", "answer": "2 #### 2"}\n' * 6
    empty = _write(tmp_path / "empty.jsonl", b"")
    train = _write(tmp_path / "train.jsonl", good)
    files = f"+task.data_files={{train: {empty}, test: {train}}}"
    with pytest.raises(ValueError, match=f"{empty}: the file holds no records"):
        run(tiny_config("model=tiny_llama", files))
    blank_test = _write(tmp_path / "blank.jsonl", b"\n\n")
    files = f"+task.data_files={{train: {train}, test: {blank_test}}}"
    with pytest.raises(ValueError, match=f"{blank_test}: the file holds no records"):
        run(tiny_config("model=tiny_llama", files, run_dir=tmp_path / "t"))
    from tests.conftest import compose_config

    cfg = compose_config(*TINY[:1], "model=tiny_llama", "logger=csv", files, config_name="evaluate")
    with open_dict(cfg):
        cfg.paths.output_dir, cfg.paths.cache_dir = str(tmp_path / "e"), str(tmp_path / "cache")
    with pytest.raises(ValueError, match=f"{blank_test}: the file holds no records"):
        evaluate(cfg)
    cfg = compose_config(*TINY[:1], "model=tiny_llama", "logger=csv", "limit=0", config_name="evaluate")
    with open_dict(cfg):
        cfg.paths.output_dir, cfg.paths.cache_dir = str(tmp_path / "e0"), str(tmp_path / "cache")
    with pytest.raises(
        ValueError, match="task 'gsm8k': the test split has no examples to evaluate \\(limit=0\\)"
    ):
        evaluate(cfg)


@pytest.mark.parametrize("suffix", [".jsonl", ".csv"])
def test_non_utf8_bytes_name_file_and_line(tiny_config, tmp_path: Path, suffix: str) -> None:
    from datamodules.sources import DataSourceError, read_file

    rows = (
        b'{"question": "a", "answer": "1"}\n' * 2 + b'{"question": "caf\xe9", "answer": "2"}\n'
        if suffix == ".jsonl"
        else b"question,answer\na,1\nb,2\ncaf\xe9,3\n"
    )
    path = _write(tmp_path / f"data{suffix}", rows)
    line = 3 if suffix == ".jsonl" else 4
    with pytest.raises(DataSourceError, match=f"{path}:{line}: not UTF-8 \\(byte 0xe9"):
        read_file(path)


def test_malformed_hotpotqa_records_are_named(tmp_path: Path) -> None:
    from datamodules.hotpotqa import knowledge_pieces
    from datamodules.sources import DataSourceError

    with pytest.raises(DataSourceError, match="dev.json\\[3\\]: HotpotQA record without 'context'"):
        knowledge_pieces({"_where": "dev.json[3]", "answer": "x", "supporting_facts": []})
    with pytest.raises(DataSourceError, match="dev.json\\[4\\]: malformed HotpotQA context/supporting_facts"):
        knowledge_pieces(
            {"_where": "dev.json[4]", "answer": "x", "context": [["A", ["s."]]], "supporting_facts": [["A"]]}
        )


def test_a_wandb_key_without_a_reachable_server_falls_back_to_offline_in_seconds(tmp_path: Path) -> None:
    import socket

    silent = socket.socket()  # accepts connections, never answers: what a blocked network looks like
    silent.bind(("127.0.0.1", 0))
    silent.listen(8)
    try:
        started = time.monotonic()
        result = launch(
            "train.py",
            *TINY,
            "model=tiny_llama",
            "logger=wandb",
            "trainer.max_steps=2",
            "test_after_fit=false",
            f"hydra.run.dir={tmp_path}",
            f"paths.cache_dir={tmp_path / 'cache'}",
            timeout=300,
            env={
                "WANDB_MODE": None,
                "WANDB_API_KEY": "k" * 86,
                "WANDB_BASE_URL": f"http://127.0.0.1:{silent.getsockname()[1]}",
            },
        )
    finally:
        silent.close()
    assert time.monotonic() - started < 120
    assert "does not answer; logging offline" in result.stdout + result.stderr
    assert read_results(tmp_path)["global_step"] == 2
    assert list(tmp_path.glob("wandb/offline-run-*"))
    assert not any(
        "k" * 86 in p.read_text(errors="ignore")
        for p in tmp_path.rglob("*")
        if p.is_file() and p.suffix in (".log", ".yaml", ".json")
    )


@pytest.mark.parametrize("kind", ["run", "sweep"])
@pytest.mark.parametrize(
    "config_name", ["train", "evaluate", "attention", "gradsim", "ripple", "noise_study"]
)
def test_every_entrypoint_run_and_sweep_dir_is_created_exclusively(
    config_name: str, kind: str, tmp_path: Path, monkeypatch
) -> None:
    """Two runs (or two `-m` sweeps) whose time stamps collide still get two directories, in every
    entrypoint's config."""
    import datetime

    import hydra.core.utils

    from tests.conftest import compose_config

    class FrozenClock(datetime.datetime):
        @classmethod
        def now(cls, tz=None):  # noqa: ANN001, ANN206
            return datetime.datetime(2026, 1, 2, 3, 4, 5, 678)

    monkeypatch.chdir(tmp_path)
    # Hydra's ${now:} resolver reads this clock
    monkeypatch.setattr(hydra.core.utils, "datetime", FrozenClock)
    dirs = [compose_config(config_name=config_name, hydra_config=True).hydra[kind].dir for _ in range(2)]
    assert dirs[0].endswith("2026-01-02_03-04-05-000678") and dirs[1] == dirs[0] + "-1"
    assert all(Path(d).is_dir() for d in dirs)
