"""Checkpoints that can be trusted: a failed or killed write keeps the previous file whole, a damaged file is
named, a non-finite loss stops the run naming the last good checkpoint, and a diverged run is marked."""

from __future__ import annotations

import errno
import math
import multiprocessing
import os
import signal
import time
from pathlib import Path

import pytest
import torch

from datamodules.padding_free import model_inputs
from lightning_modules.base import NonFiniteLossError
from runtime import checkpointing
from runtime.checkpointing import AtomicCheckpointIO, CheckpointError, load_checkpoint_file, write_atomically
from runtime.results import read_results
from runtime.sweeps import summarize
from runtime.training import run
from runtime.validate import ConfigError


def test_a_failed_write_keeps_the_previous_checkpoint_and_leaves_no_partial_file(
    tiny_config, tmp_path: Path, monkeypatch
) -> None:
    overrides = [
        "model=tiny_llama",
        "method=lora",
        "trainer.max_steps=4",
        "callbacks.last_checkpoint.every_n_train_steps=2",
        "test_after_fit=false",
    ]
    cfg = tiny_config(*overrides)
    real_save = torch.save

    def disk_full_on_second_write(obj, handle, *args, **kwargs) -> None:
        if disk_full_on_second_write.calls == 1:
            handle.write(b"half a checkpoint")
            raise OSError(errno.ENOSPC, "No space left on device")
        disk_full_on_second_write.calls += 1
        real_save(obj, handle, *args, **kwargs)

    disk_full_on_second_write.calls = 0
    monkeypatch.setattr(checkpointing.torch, "save", disk_full_on_second_write)
    with pytest.raises(OSError, match="No space left"):
        run(cfg)
    checkpoints = tmp_path / "run" / "checkpoints"
    # no temp file and no half file: last.ckpt (and the copy kept beside it) still hold step 2
    assert sorted(p.name for p in checkpoints.iterdir()) == ["last.ckpt", "last.ckpt.previous"]
    assert load_checkpoint_file(checkpoints / "last.ckpt")["global_step"] == 2
    monkeypatch.setattr(checkpointing.torch, "save", real_save)
    resumed = run(
        tiny_config(*overrides, f"ckpt_path={checkpoints / 'last.ckpt'}", run_dir=tmp_path / "resumed")
    )
    assert resumed["global_step"] == 4


def _slow_writer(path: str, started) -> None:
    def write(handle) -> None:
        handle.write(b"new bytes that never finish")
        handle.flush()
        started.set()
        time.sleep(60)

    write_atomically(path, write)


def test_sigkill_during_a_write_leaves_the_old_file_whole(tmp_path: Path) -> None:
    target = tmp_path / "last.ckpt"
    AtomicCheckpointIO().save_checkpoint({"state_dict": {"w": torch.ones(3)}, "global_step": 1}, target)
    started = multiprocessing.get_context("spawn").Event()
    writer = multiprocessing.get_context("spawn").Process(target=_slow_writer, args=(str(target), started))
    writer.start()
    assert started.wait(60)
    os.kill(writer.pid, signal.SIGKILL)
    writer.join()
    assert torch.equal(load_checkpoint_file(target)["state_dict"]["w"], torch.ones(3))
    # the killed writer's temp file, never under the real name
    (partial,) = tmp_path.glob(".last.ckpt.*.partial")
    assert checkpointing.remove_partial_files(tmp_path) == [partial] and not partial.exists()


def test_empty_and_truncated_checkpoints_are_named(tiny_config, tmp_path: Path) -> None:
    results = run(
        tiny_config("model=tiny_llama", "method=lora", "trainer.max_steps=2", "test_after_fit=false")
    )
    good = Path(results["run_dir"]) / "checkpoints" / "last.ckpt"
    empty, truncated = tmp_path / "empty.ckpt", tmp_path / "truncated.ckpt"
    empty.touch()
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(ConfigError, match=f"ckpt_path={empty}: the checkpoint file is empty"):
        run(tiny_config("model=tiny_llama", "method=lora", f"ckpt_path={empty}", run_dir=tmp_path / "a"))
    with pytest.raises(
        CheckpointError, match=f"{truncated}: not a readable checkpoint, truncated or corrupt"
    ):
        run(tiny_config("model=tiny_llama", "method=lora", f"ckpt_path={truncated}", run_dir=tmp_path / "b"))


def test_lr_1e9_full_stops_naming_a_checkpoint_whose_weights_give_a_finite_loss(
    tiny_config, tmp_path: Path
) -> None:
    # warmup from lr 0: the first steps are sane, then the weights explode within a step or two
    cfg = tiny_config(
        "model=tiny_llama",
        "method=full",
        "optim.lr=1e9",
        "optim.warmup_ratio=0.5",
        "trainer.max_steps=20",
        "callbacks.last_checkpoint.every_n_train_steps=1",
    )
    with pytest.raises(NonFiniteLossError) as caught:
        run(cfg)
    step, path = caught.value.good_checkpoint
    assert f"The last good checkpoint is {path} (step {step})" in str(caught.value)
    assert step < caught.value.step
    saved = load_checkpoint_file(path)
    assert saved["global_step"] == step
    from runtime.training import build_trainable_model

    model, _, datamodule, _ = build_trainable_model(
        tiny_config("model=tiny_llama", "method=full", run_dir=tmp_path / "check")
    )
    model.load_state_dict({k.removeprefix("model."): v for k, v in saved["state_dict"].items()})
    datamodule.setup("fit")
    with torch.no_grad():
        losses = [model(**model_inputs(batch)).loss.item() for batch in datamodule.train_dataloader()]
    assert all(math.isfinite(loss) for loss in losses)


def test_nan_before_any_checkpoint_says_there_is_none(tiny_config, tmp_path: Path) -> None:
    cfg = tiny_config(
        "model=tiny_llama", "method=full", "optim.lr=1e9", "optim.warmup_ratio=0", "trainer.max_epochs=3"
    )
    with pytest.raises(
        NonFiniteLossError, match="No good checkpoint was written before this step .*nothing to resume from"
    ):
        run(cfg)


def test_a_diverged_lora_run_is_marked_in_results(tiny_config) -> None:
    results = run(
        tiny_config(
            "model=tiny_llama", "method=lora", "optim.lr=1e9", "optim.warmup_ratio=0", "trainer.max_steps=4"
        )
    )
    assert results["diverged"] is True
    assert results["max_abs_trainable_weight"] > 1e4
    assert "divergence_max_abs_weight=10000" in results["divergence_reason"]
    assert read_results(Path(results["run_dir"]))["diverged"] is True
    healthy = run(
        tiny_config(
            "model=tiny_llama",
            "method=lora",
            "trainer.max_steps=2",
            run_dir=Path(results["run_dir"]).parent / "ok",
        )
    )
    assert healthy["diverged"] is False and healthy["max_abs_trainable_weight"] < 10
    rows = {
        row["job"]: row for row in summarize(Path(results["run_dir"]).parent)
    }  # a sweep's summary shows it too
    assert rows["run"]["diverged"] is True and rows["ok"]["diverged"] is False
