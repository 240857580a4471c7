"""Resuming an interrupted run ends where the uninterrupted run ends, bit for bit: after Ctrl-C or SIGKILL,
mid-epoch or at an epoch boundary, with dropout on, on one process, DDP and FSDP."""

from __future__ import annotations

import signal
import subprocess
from pathlib import Path

import pytest
import torch
from omegaconf import open_dict

from runtime import rng_state
from runtime.results import read_results
from runtime.training import run
from tests.conftest import TINY, launch
from tests.test_train import final_weights

# 20 train examples in batches of 4: 5 batches an epoch; last.ckpt every 3 steps, so step 7 is mid-epoch 1
RESUMABLE = [
    "model=tiny_llama",
    "trainer.max_epochs=3",
    "data.max_train_samples=20",
    "data.val_size=8",
    "callbacks.last_checkpoint.every_n_train_steps=3",
    "test_after_fit=false",
]


DROPOUT = {
    "lora": ["method=lora", "method.dropout=0.1"],
    "full": ["method=full", "+model.architecture.attention_dropout=0.2"],
}


def interrupted_run(tiny_config, overrides: list[str], run_dir: Path, step: int) -> Path:
    """Run until Ctrl-C before optimizer step `step`; return the run's last.ckpt."""
    cfg = tiny_config(*overrides, run_dir=run_dir)
    with open_dict(cfg):
        cfg.callbacks.interrupt = {"_target_": "tests.helpers.InterruptAtStep", "step": step}
    try:
        with pytest.raises(SystemExit):  # Lightning's graceful Ctrl-C handling exits with status 1
            run(cfg)
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler)  # Lightning ignores SIGINT after Ctrl-C
    return run_dir / "checkpoints" / "last.ckpt"


def assert_same_run(straight: dict, resumed: dict) -> None:
    assert resumed["global_step"] == straight["global_step"]
    a, b = final_weights(straight), final_weights(resumed)
    assert a.keys() == b.keys() and a
    assert all(torch.equal(a[k], b[k]) for k in a), max((a[k] - b[k]).abs().max().item() for k in a)
    for key in ("val/loss", "val/token_acc", "train/loss_epoch"):
        assert resumed["metrics"][key] == straight["metrics"][key], key


@pytest.mark.parametrize("method", ["lora", "full"])
@pytest.mark.parametrize("stop_step", [7, 5], ids=["mid_epoch", "epoch_boundary"])
def test_resume_after_ctrl_c_ends_bit_identical_with_dropout_on(
    tiny_config, tmp_path: Path, method: str, stop_step: int
) -> None:
    overrides = [*RESUMABLE, *DROPOUT[method]]
    if stop_step == 5:  # the epoch-end checkpoint (every epoch), not a step one
        overrides = [o for o in overrides if "every_n_train_steps" not in o]
    straight = run(tiny_config(*overrides, run_dir=tmp_path / "straight"))
    last = interrupted_run(tiny_config, overrides, tmp_path / "interrupted", stop_step)
    saved = torch.load(last, weights_only=True)
    assert saved["global_step"] == (6 if stop_step == 7 else 5)
    resumed = run(tiny_config(*overrides, f"ckpt_path={last}", run_dir=tmp_path / "resumed"))
    assert_same_run(straight, resumed)


def test_data_position_and_rng_each_matter_for_a_mid_epoch_resume(
    tiny_config, tmp_path: Path, monkeypatch
) -> None:
    """The two halves of the fix: without either, the same resume ends with different weights."""
    overrides = [*RESUMABLE, *DROPOUT["lora"]]
    straight = run(tiny_config(*overrides, run_dir=tmp_path / "straight"))
    last = interrupted_run(tiny_config, overrides, tmp_path / "interrupted", 7)
    monkeypatch.setattr(rng_state.RestoreRNG, "on_train_batch_start", lambda *args: None)
    resumed = run(tiny_config(*overrides, f"ckpt_path={last}", run_dir=tmp_path / "no_rng"))
    a, b = final_weights(straight), final_weights(resumed)
    assert any(not torch.equal(a[k], b[k]) for k in a)


def train_process(*overrides: str, run_dir: Path) -> subprocess.CompletedProcess:
    return launch(
        "train.py",
        *TINY,
        *overrides,
        f"hydra.run.dir={run_dir}",
        f"paths.cache_dir={run_dir.parent / 'cache'}",
        check=False,
    )


def killed_run(overrides: list[str], tmp_path: Path, step: int) -> tuple[int, Path]:
    """Train once straight through (`straight`), then again killed with SIGKILL at global step `step`
    (`killed`); the killed run's return code and its last checkpoint."""
    assert train_process(*overrides, run_dir=tmp_path / "straight").returncode == 0
    killed = train_process(
        *overrides,
        "+callbacks.kill._target_=tests.helpers.InterruptAtStep",
        f"+callbacks.kill.step={step}",
        "+callbacks.kill.kill=true",
        run_dir=tmp_path / "killed",
    )
    return killed.returncode, tmp_path / "killed" / "checkpoints" / "last.ckpt"


def assert_resume_matches(overrides: list[str], last: Path, tmp_path: Path) -> None:
    """Resume from `last` (`resumed`): it must end as the straight run did."""
    resumed = train_process(*overrides, f"ckpt_path={last}", run_dir=tmp_path / "resumed")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    straight, again = (read_results(tmp_path / d) for d in ("straight", "resumed"))
    assert_same_run(straight, again)


def test_sigkill_mid_epoch_then_resume_matches_an_uninterrupted_run(tmp_path: Path) -> None:
    overrides = [*RESUMABLE, *DROPOUT["lora"]]
    code, last = killed_run(overrides, tmp_path, step=8)
    assert code == -signal.SIGKILL
    assert torch.load(last, weights_only=True)["global_step"] == 6
    assert_resume_matches(overrides, last, tmp_path)


@pytest.mark.xdist_group("processes")  # starts several training processes: one such test at a time
def test_ddp_two_processes_killed_mid_epoch_resume_bit_identical(tmp_path: Path) -> None:
    overrides = [
        *RESUMABLE,
        *DROPOUT["lora"],
        "trainer=ddp",
        "trainer.accelerator=cpu",
        "trainer.devices=2",
        "callbacks.last_checkpoint.every_n_train_steps=2",
    ]
    # 20 examples over 2 ranks in batches of 4: 3 batches an epoch per rank; step 4 is mid-epoch 1
    code, last = killed_run(overrides, tmp_path, step=5)
    assert code != 0
    saved = torch.load(last, weights_only=True)
    assert saved["global_step"] == 4 and len(saved[rng_state.RNG_KEY]) == 2
    assert_resume_matches(overrides, last, tmp_path)


@pytest.mark.xdist_group("processes")  # starts several training processes: one such test at a time
@pytest.mark.parametrize(("method", "state_dict_type"), [("full", "full"), ("lora", "sharded")])
def test_fsdp_two_processes_killed_mid_epoch_resume_bit_identical(
    tmp_path: Path, method: str, state_dict_type: str
) -> None:
    """The same kill and resume under FSDP (2 CPU processes, gloo), from a consolidated checkpoint (re-sharded
    on load) and from a sharded one (a directory with one file per rank)."""
    overrides = [
        *RESUMABLE,
        *DROPOUT[method],
        "trainer=fsdp",
        "trainer.accelerator=cpu",
        "trainer.devices=2",
        "trainer.precision=32-true",
        "callbacks.last_checkpoint.every_n_train_steps=2",
        f"+trainer.strategy.state_dict_type={state_dict_type}",
    ]
    code, last = killed_run(overrides, tmp_path, step=5)
    assert code != 0
    assert last.is_dir() == (state_dict_type == "sharded")
    assert torch.load(last / "meta.pt" if last.is_dir() else last, weights_only=True)["global_step"] == 4
    assert_resume_matches(overrides, last, tmp_path)
