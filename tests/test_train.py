"""The training stack on tiny models: every architecture x method trains, overfits, resumes exactly, stops on
NaN."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import lightning as L
import pytest
import torch
from omegaconf import open_dict
from safetensors.torch import load_file
from torch.utils.data import DataLoader

from datamodules.padding_free import model_inputs
from lightning_modules.base import NonFiniteLossError
from lightning_modules.task_modules import task_module_class
from runtime.results import logged_rows
from runtime.training import build_trainable_model, run

TINY_MODELS = ["tiny_llama", "tiny_diffllama", "tiny_gpt2", "tiny_qwen2"]


def final_weights(results: dict) -> dict[str, torch.Tensor]:
    directory = Path(results["final_dir"])
    name = (
        "adapter_model.safetensors" if (directory / "adapter_config.json").exists() else "model.safetensors"
    )
    return load_file(directory / name)


@pytest.mark.parametrize("method", ["full", "lora"])
@pytest.mark.parametrize("model", TINY_MODELS)
def test_every_tiny_model_trains_with_every_method(tiny_config, model: str, method: str) -> None:
    cfg = tiny_config(
        f"model={model}", f"method={method}", "trainer.max_steps=3", "data.max_train_samples=12"
    )
    L.seed_everything(cfg.seed)
    initial = {n: p.detach().clone() for n, p in build_trainable_model(cfg)[0].named_parameters()}
    results = run(cfg)

    assert results["global_step"] == 3
    trained = final_weights(results)
    if method == "full":
        assert results["trainable_params"] == results["total_params"]
        changed = [n for n, w in trained.items() if n in initial and not torch.equal(w, initial[n])]
        assert len(changed) > len(trained) // 2
    else:
        assert 0 < results["trainable_share"] < 0.5
        assert trained and all("lora_" in name for name in trained)
        assert any(name.endswith("lora_B.weight") and w.abs().sum() > 0 for name, w in trained.items())
    assert torch.isfinite(torch.tensor(results["metrics"]["test/loss"]))


def test_run_directory_holds_config_metrics_checkpoints_results(tiny_config, tmp_path: Path) -> None:
    results = run(tiny_config("model=tiny_llama", "method=lora", "data.max_train_samples=8"))
    run_dir = Path(results["run_dir"])
    assert (run_dir / "config.yaml").read_text().count("tiny_llama") >= 1
    lines = (run_dir / "results.json").read_text().splitlines()
    assert len(lines) == 1 and json.loads(lines[0])["trainable_params"] == results["trainable_params"]
    header = (run_dir / "metrics" / "metrics.csv").read_text().splitlines()[0].split(",")
    assert {"train/loss_step", "val/loss", "val/ppl", "test/token_acc", "lr-AdamW"} <= set(header)
    assert (run_dir / "checkpoints" / "last.ckpt").exists()
    assert (run_dir / "final" / "adapter_model.safetensors").exists()


def test_metrics_beyond_the_loss_are_computed_every_n_steps(tiny_config) -> None:
    # one epoch of 5 steps, then val
    results = run(
        tiny_config(
            "model=tiny_llama",
            "method=lora",
            "trainer.max_steps=5",
            "metrics.every_n_steps=2",
            "data.max_train_samples=20",
            "test_after_fit=false",
        )
    )
    rows = logged_rows(Path(results["run_dir"]))

    def steps(key: str) -> list[int]:
        return [int(row["step"]) for row in rows if key in row]

    assert steps("train/loss_step") == [0, 1, 2, 3, 4]
    assert (
        steps("train/top5_acc_step") == steps("train/token_acc_step") == steps("train/grad_norm") == [0, 2, 4]
    )
    # the epoch value averages the measured steps only
    step_values = [float(row["train/token_acc_step"]) for row in rows if row.get("train/token_acc_step")]
    assert results["metrics"]["train/token_acc"] == pytest.approx(sum(step_values) / 3, abs=0.05)
    # validation measures all
    assert {"val/token_acc", "val/top5_acc", "val/confidence"} <= set(results["metrics"])
    # FLOP/s from the counted FLOPs of each batch, and MFU against this CPU's measured peak
    (mfu,) = [float(row["train/device/mfu"]) for row in rows if row.get("train/device/mfu")]
    assert 0 < mfu < 1
    with pytest.raises(ValueError, match=r"metrics.every_n_steps=0: expected an integer >= 1"):
        run(tiny_config("model=tiny_llama", "metrics.every_n_steps=0"))


def test_lora_checkpoint_holds_only_the_lora_weights(tiny_config) -> None:
    results = run(tiny_config("model=tiny_llama", "method=lora", "trainer.max_steps=2"))
    checkpoint = torch.load(Path(results["run_dir"]) / "checkpoints" / "last.ckpt", weights_only=True)
    keys = list(checkpoint["state_dict"])
    assert keys and all("lora_" in key for key in keys)
    assert len(keys) == 2 * 7 * 2  # A and B, seven projections, two layers


def test_overfitting_one_batch_lowers_the_loss_by_a_clear_margin(tiny_config) -> None:
    cfg = tiny_config("model=tiny_llama", "method=full", "optim.lr=3e-3", "optim.warmup_ratio=0")
    L.seed_everything(cfg.seed)
    model, tokenizer, datamodule, _ = build_trainable_model(cfg)
    datamodule.setup("fit")
    batch = next(iter(datamodule.train_dataloader()))
    module = task_module_class("causal_lm")(model, **cfg.optim)

    def loss() -> float:
        with torch.no_grad():
            return model(**model_inputs(batch)).loss.item()

    before = loss()
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=60,
        overfit_batches=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
    )
    trainer.fit(module, train_dataloaders=DataLoader([batch], batch_size=None))
    assert loss() < 0.5 * before


def test_interrupted_run_resumes_to_the_same_weights(tiny_config, tmp_path: Path) -> None:
    common = [
        "model=tiny_llama",
        "method=lora",
        "method.dropout=0",
        "trainer.max_epochs=3",
        "data.max_train_samples=8",
    ]
    straight = run(tiny_config(*common, run_dir=tmp_path / "straight"))

    interrupted = tiny_config(*common, run_dir=tmp_path / "interrupted")
    with open_dict(interrupted):
        interrupted.callbacks.interrupt = {"_target_": "tests.helpers.InterruptAtEpoch", "epoch": 2}
    try:
        with pytest.raises(SystemExit):  # Lightning's graceful Ctrl-C handling exits with status 1
            run(interrupted)
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler)  # Lightning ignores SIGINT after Ctrl-C
    assert not (tmp_path / "interrupted" / "results.json").exists()

    last = tmp_path / "interrupted" / "checkpoints" / "last.ckpt"
    resumed = run(tiny_config(*common, f"ckpt_path={last}", run_dir=tmp_path / "resumed"))
    assert resumed["global_step"] == straight["global_step"] == 6
    a, b = final_weights(straight), final_weights(resumed)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_nan_loss_stops_the_run_and_rolls_back_the_checkpoint_of_the_nan_weights(
    tiny_config, tmp_path: Path
) -> None:
    cfg = tiny_config(
        "model=tiny_llama",
        "method=full",
        "trainer.max_steps=10",
        "callbacks.last_checkpoint.every_n_train_steps=1",
    )
    with open_dict(cfg):
        cfg.callbacks.poison = {"_target_": "tests.helpers.PoisonWeightsAtStep", "step": 3}
    last = tmp_path / "run" / "checkpoints" / "last.ckpt"
    with pytest.raises(
        NonFiniteLossError,
        match=f"training loss is nan at global step 3 .*The last good checkpoint is {last} \\(step 2\\)",
    ):
        run(cfg)
    checkpoint = torch.load(last, weights_only=True)
    assert checkpoint["global_step"] == 2  # the step-3 file held the weights whose loss was NaN: rolled back
    assert all(torch.isfinite(t).all() for t in checkpoint["state_dict"].values())


def test_bf16_mixed_precision_trains_on_cpu(tiny_config) -> None:
    results = run(
        tiny_config(
            "model=tiny_qwen2", "method=lora", "trainer.precision=bf16-mixed", "data.max_train_samples=8"
        )
    )
    assert torch.isfinite(torch.tensor(results["metrics"]["val/loss"]))


def test_a_failing_test_stage_leaves_the_export_written_and_says_where(
    tiny_config, tmp_path: Path, caplog
) -> None:
    cfg = tiny_config(
        "model=tiny_llama",
        "method=lora",
        "trainer.max_steps=2",
        "data.max_train_samples=8",
        "+callbacks.fail._target_=tests.helpers.FailAtTest",
        run_dir=tmp_path / "run",
    )
    with pytest.raises(RuntimeError, match="the test stage broke"):
        run(cfg)
    assert (tmp_path / "run" / "final" / "adapter_model.safetensors").exists()
    assert f"the trained weights are exported to {tmp_path / 'run' / 'final'}" in caplog.text


def test_test_ckpt_best_measures_the_lowest_validation_loss_checkpoint(tiny_config, tmp_path: Path) -> None:
    cfg = tiny_config(
        "model=tiny_llama",
        "method=full",
        "trainer.max_epochs=3",
        "data.max_train_samples=16",
        "optim.lr=3e-3",
        "test_ckpt=best",
        run_dir=tmp_path / "run",
    )
    results = run(cfg)
    tested = results["tested"]
    validation = [
        (row["val/loss"], int(row["step"])) for row in logged_rows(tmp_path / "run") if "val/loss" in row
    ]
    assert len(validation) == 3 and tested["weights"] == "best"
    assert (
        tested["val/loss"] == pytest.approx(min(validation)[0])
        and tested["global_step"] == min(validation)[1] + 1
    )
    # an independent measurement: a fresh module carrying the checkpoint's weights, tested by a new Trainer
    L.seed_everything(cfg.seed)
    model, _, datamodule, _ = build_trainable_model(cfg)
    module = task_module_class("causal_lm").from_config(model, cfg, datamodule.task)
    module.load_state_dict(torch.load(tested["checkpoint"], weights_only=True)["state_dict"])
    trainer = L.Trainer(
        accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False
    )
    (measured,) = trainer.test(module, datamodule=datamodule, verbose=False)
    assert results["metrics"]["test/loss"] == pytest.approx(measured["test/loss"], rel=1e-6)


def test_test_ckpt_must_be_last_or_best(tiny_config) -> None:
    with pytest.raises(ValueError, match="test_ckpt=newest: one of last, best"):
        run(tiny_config("model=tiny_llama", "test_ckpt=newest"))
