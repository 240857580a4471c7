"""Every shipped experiment runs (fast_dev_run), and the training path reproduces golden per-step losses."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
from omegaconf import open_dict

from runtime.training import run
from tests.conftest import CONF_DIR, TINY, compose_config

EXPERIMENTS = sorted(str(p.relative_to(CONF_DIR / "experiment").with_suffix("")) for p in (CONF_DIR / "experiment").rglob("*.yaml"))
# models that only the hub serves are swapped for the tiny model of their family; the experiment's other settings stay
TINY_OF_FAMILY = {"llama": "tiny_llama", "diffllama": "tiny_diffllama", "qwen2": "tiny_qwen2", "gpt2": "tiny_gpt2"}


def test_every_experiment_is_listed() -> None:
    assert len(EXPERIMENTS) == 15 and {"demo", "ablation/baseline", "ablation_tiny/small_model", "socratic_math"} <= set(EXPERIMENTS)


@pytest.fixture(scope="module")
def shared_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One model cache for all experiments: the SmolLM2 GGUF is dequantised once, not once per experiment."""
    return tmp_path_factory.mktemp("cache")


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_experiment_runs_one_fast_dev_run_step(experiment: str, tmp_path: Path, shared_cache: Path) -> None:
    # the bundled sample stands in for the experiment's data, a quarter of it held out
    overrides = [f"experiment={experiment}", "trainer=debug", "task.source=bundled", "data.val_size=0.25", "logger=csv",
                 "print_config=false"]
    composed = compose_config(*overrides)
    if "text_fields" in composed.task:  # the bundled pre-training sample is GSM8K text
        overrides.append("task.text_fields=[question,answer]")
    model = composed.model
    if model.get("hub_id") and not (model.get("gguf") or model.get("scratch")):
        overrides.append(f"model={TINY_OF_FAMILY[model.family]}")
    cfg = compose_config(*overrides)
    with open_dict(cfg):
        cfg.paths.output_dir = str(tmp_path / "run")
        cfg.paths.cache_dir = str(shared_cache)
    reference = compose_config(f"experiment={experiment}")
    assert (cfg.optim, cfg.method, cfg.task.name) == (reference.optim, reference.method, reference.task.name)
    results = run(cfg)
    assert results["global_step"] == 1 and results["run_name"] == reference.run_name
    assert all(value == value for value in results["metrics"].values())  # no NaN on a real batch


# per-step training losses of 3 steps on tiny_llama, seed 42, the first 12 bundled GSM8K problems (batch 4), recorded
# at commit time: any change in the model build, data order, masking, dropout, loss or optimiser path moves them.
# Step 0 is the same for both: nothing has trained yet.
GOLDEN_LOSSES = {
    "lora": [5.536789, 5.554510, 5.546232],
    "full": [5.536789, 5.523860, 5.491010],
}


@pytest.mark.parametrize("method", sorted(GOLDEN_LOSSES))
def test_training_reproduces_golden_losses(method: str, tmp_path: Path) -> None:
    cfg = compose_config(*TINY, "model=tiny_llama", f"method={method}", "trainer.max_steps=3", "test_after_fit=false",
                         "data.max_train_samples=12")
    with open_dict(cfg):
        cfg.paths.output_dir = str(tmp_path / "run")
    run(cfg)
    with (tmp_path / "run" / "metrics" / "metrics.csv").open() as handle:
        losses = [float(row["train/loss_step"]) for row in csv.DictReader(handle) if row.get("train/loss_step")]
    assert losses == pytest.approx(GOLDEN_LOSSES[method], abs=1e-5, rel=0)
