"""Trustworthy runs: exact resume after any kill, checkpoints no kill can destroy, honest NaN and divergence
reports, unique run dirs, checkpoints bound to their base model, and bad input named before it costs
anything."""

from __future__ import annotations

import errno
import json
import math
import multiprocessing
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from omegaconf import open_dict

from datamodules.padding_free import model_inputs
from lightning_modules.base import NonFiniteLossError
from lightning_modules.methods import UnknownMethodError
from modeling.model_checks import ModelLoadError
from runtime import checkpointing, rng_state
from runtime.checkpointing import AtomicCheckpointIO, CheckpointError, load_checkpoint_file, write_atomically
from runtime.results import read_results
from runtime.run_dir import create_unique_dir
from runtime.saved_run import METHOD_FILE, TRAINABLE_FILE, restore_method
from runtime.sweeps import summarize
from runtime.training import run
from runtime.validate import ConfigError
from tests.conftest import ROOT, TINY, launch
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
    "full": ["method=full", "+model.scratch.attention_dropout=0.2"],
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


def test_sigkill_mid_epoch_then_resume_matches_an_uninterrupted_run(tmp_path: Path) -> None:
    overrides = [*RESUMABLE, *DROPOUT["lora"]]
    assert train_process(*overrides, run_dir=tmp_path / "straight").returncode == 0
    killed = train_process(
        *overrides,
        "+callbacks.kill._target_=tests.helpers.InterruptAtStep",
        "+callbacks.kill.step=8",
        "+callbacks.kill.kill=true",
        run_dir=tmp_path / "killed",
    )
    assert killed.returncode == -signal.SIGKILL
    last = tmp_path / "killed" / "checkpoints" / "last.ckpt"
    assert torch.load(last, weights_only=True)["global_step"] == 6
    resumed = train_process(*overrides, f"ckpt_path={last}", run_dir=tmp_path / "resumed")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    straight, again = (read_results(tmp_path / d) for d in ("straight", "resumed"))
    assert_same_run(straight, again)


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
    assert train_process(*overrides, run_dir=tmp_path / "straight").returncode == 0
    killed = train_process(
        *overrides,
        "+callbacks.kill._target_=tests.helpers.InterruptAtStep",
        "+callbacks.kill.step=5",
        "+callbacks.kill.kill=true",
        run_dir=tmp_path / "killed",
    )
    assert killed.returncode != 0
    last = tmp_path / "killed" / "checkpoints" / "last.ckpt"
    saved = torch.load(last, weights_only=True)
    assert saved["global_step"] == 4 and len(saved[rng_state.RNG_KEY]) == 2
    resumed = train_process(*overrides, f"ckpt_path={last}", run_dir=tmp_path / "resumed")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    straight, again = (read_results(tmp_path / d) for d in ("straight", "resumed"))
    assert_same_run(straight, again)


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
    assert train_process(*overrides, run_dir=tmp_path / "straight").returncode == 0
    killed = train_process(
        *overrides,
        "+callbacks.kill._target_=tests.helpers.InterruptAtStep",
        "+callbacks.kill.step=5",
        "+callbacks.kill.kill=true",
        run_dir=tmp_path / "killed",
    )
    assert killed.returncode != 0
    last = tmp_path / "killed" / "checkpoints" / "last.ckpt"
    assert last.is_dir() == (state_dict_type == "sharded")
    assert torch.load(last / "meta.pt" if last.is_dir() else last, weights_only=True)["global_step"] == 4
    resumed = train_process(*overrides, f"ckpt_path={last}", run_dir=tmp_path / "resumed")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    straight, again = (read_results(tmp_path / d) for d in ("straight", "resumed"))
    assert_same_run(straight, again)


# -- checkpoint writes
# --------------------------------------------------------------------------------------------


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


# -- NaN and divergence
# -------------------------------------------------------------------------------------------


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


# -- checkpoints bound to their base model, and no code run from a checkpoint
# -------------------------------------


def evaluate_process(*overrides: str, cwd: Path) -> subprocess.CompletedProcess:
    return launch(
        str(ROOT / "evaluate.py"),
        *TINY[:1],
        "logger=csv",
        "print_config=false",
        "limit=2",
        "generation.max_new_tokens=4",
        f"paths.cache_dir={cwd / 'cache'}",
        f"hydra.run.dir={cwd / 'eval'}",
        *overrides,
        check=False,
    )


def test_an_adapter_is_never_applied_to_another_base_model(tiny_config, tmp_path: Path) -> None:
    lora = run(tiny_config("model=tiny_llama", "method=lora", "trainer.max_steps=2", "test_after_fit=false"))
    identity = json.loads((Path(lora["final_dir"]) / "base_model.json").read_text())
    assert identity["name"] == "tiny_llama" and identity["architecture"] == "LlamaForCausalLM"

    wrong = evaluate_process("model=tiny_qwen2", f"ckpt={lora['run_dir']}", cwd=tmp_path)
    assert wrong.returncode != 0
    assert (
        "was trained on model 'tiny_llama'" in wrong.stderr
        and "this run built model 'tiny_qwen2'" in wrong.stderr
    )
    implied = evaluate_process(f"ckpt={lora['run_dir']}", cwd=tmp_path)
    assert implied.returncode == 0, implied.stderr[-3000:]
    assert read_results(tmp_path / "eval")["model"] == "tiny_llama"

    last = Path(lora["run_dir"]) / "checkpoints" / "last.ckpt"
    with pytest.raises(
        ModelLoadError, match="the checkpoint \\(ckpt_path\\) was trained on model 'tiny_llama'"
    ):
        run(tiny_config("model=tiny_qwen2", "method=lora", f"ckpt_path={last}", run_dir=tmp_path / "resume"))


def test_a_checkpoint_with_unused_keys_is_refused(tiny_config, tmp_path: Path) -> None:
    lora = run(tiny_config("model=tiny_llama", "method=lora", "trainer.max_steps=2", "test_after_fit=false"))
    last = Path(lora["run_dir"]) / "checkpoints" / "last.ckpt"
    checkpoint = torch.load(last, weights_only=True)
    checkpoint["state_dict"]["model.not_a_weight"] = torch.zeros(1)
    checkpoint.pop("lmlab_base_model")
    edited = tmp_path / "edited.ckpt"
    torch.save(checkpoint, edited)
    with pytest.raises(ModelLoadError, match="unused \\['model.not_a_weight'\\]"):
        run(
            tiny_config("model=tiny_llama", "method=lora", f"ckpt_path={edited}", run_dir=tmp_path / "resume")
        )


def test_method_json_can_only_name_a_registered_method(tiny_config, tmp_path: Path) -> None:
    from modeling.models import build

    results = run(
        tiny_config("model=tiny_llama", "method=adapter", "trainer.max_steps=1", "test_after_fit=false")
    )
    directory = Path(results["final_dir"])
    spec = json.loads((directory / METHOD_FILE).read_text())
    cfg = tiny_config("model=tiny_llama")
    (directory / METHOD_FILE).write_text(json.dumps({**spec, "name": "builtins.print"}))
    with pytest.raises(UnknownMethodError, match="'builtins.print' is not a registered lmlab method"):
        restore_method(build(cfg.model)[0], directory, cfg.model)
    # a target in the file selects nothing: the registered name does
    (directory / METHOD_FILE).write_text(
        json.dumps({**spec, "_target_": "builtins.exec", "apply": "builtins.exec"})
    )
    restored = restore_method(build(cfg.model)[0], directory, cfg.model)
    assert all(hasattr(block, "mlp_adapter") for block in restored.model.layers)


def test_model_revision_reaches_every_hub_load(monkeypatch) -> None:
    from modeling import models
    from tests.conftest import compose_config

    seen = []

    def load_model(*args, **kwargs):
        seen.append(("model", kwargs))
        raise _Loaded

    monkeypatch.setattr(models.AutoModelForCausalLM, "from_pretrained", load_model)
    monkeypatch.setattr(
        models.AutoTokenizer, "from_pretrained", lambda *a, **k: seen.append(("tokenizer", k)) or _Tok()
    )
    with pytest.raises(_Loaded):
        models.build(compose_config("model=minimind2", "model.revision=abc123").model)
    assert {kind: kwargs.get("revision") for kind, kwargs in seen} == {
        "model": "abc123",
        "tokenizer": "abc123",
    }
    assert all(kwargs["trust_remote_code"] is True for _, kwargs in seen)


class _Tok:
    pad_token, eos_token = "x", "x"


class _Loaded(Exception):
    """The model loader was reached (with the keyword arguments recorded)."""


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
    from runtime.evaluation import run as evaluate

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


def test_corrupt_safetensors_are_named(tiny_config, tmp_path: Path) -> None:
    from modeling.models import build

    full = run(
        tiny_config(
            "model=tiny_llama",
            "method=full",
            "trainer.max_steps=1",
            "test_after_fit=false",
            run_dir=tmp_path / "full",
        )
    )
    weights = Path(full["final_dir"]) / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    cfg = tiny_config("model=tiny_llama", f"+model.path={full['final_dir']}")
    with pytest.raises(
        ModelLoadError,
        match=f"model.path={full['final_dir']}: its weights \\(model.safetensors\\) could not be read",
    ):
        build(cfg.model)

    adapter = run(
        tiny_config(
            "model=tiny_llama",
            "method=adapter",
            "trainer.max_steps=1",
            "test_after_fit=false",
            run_dir=tmp_path / "ad",
        )
    )
    trainable = Path(adapter["final_dir"]) / TRAINABLE_FILE
    trainable.write_bytes(b"\x00" * 16)
    base = tiny_config("model=tiny_llama")
    with pytest.raises(ValueError, match=f"{trainable}: not a readable safetensors file"):
        restore_method(build(base.model)[0], Path(adapter["final_dir"]), base.model)

    lora = run(
        tiny_config(
            "model=tiny_llama",
            "method=lora",
            "trainer.max_steps=1",
            "test_after_fit=false",
            run_dir=tmp_path / "lo",
        )
    )
    adapter_file = Path(lora["final_dir"]) / "adapter_model.safetensors"
    adapter_file.write_bytes(b"junk")
    result = evaluate_process(f"ckpt={lora['run_dir']}", cwd=tmp_path)
    assert result.returncode != 0 and f"{adapter_file}: not a readable safetensors file" in result.stderr


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
