"""Every shipped experiment runs (fast_dev_run), and the training path reproduces golden per-step losses."""

from __future__ import annotations

from pathlib import Path

import pytest
from omegaconf import open_dict

from runtime.results import logged_rows
from runtime.training import run
from tests.conftest import CONF_DIR, TINY, compose_config

EXPERIMENTS = sorted(
    str(p.relative_to(CONF_DIR / "experiment").with_suffix(""))
    for p in (CONF_DIR / "experiment").rglob("*.yaml")
)
# models that only the hub serves are swapped for the tiny model of their family; the experiment's other
# settings stay
TINY_OF_FAMILY = {
    "llama": "tiny_llama",
    "diffllama": "tiny_diffllama",
    "qwen2": "tiny_qwen2",
    "gpt2": "tiny_gpt2",
}


def test_every_experiment_is_listed() -> None:
    assert len(EXPERIMENTS) == 15 and {
        "demo",
        "ablation/baseline",
        "ablation_tiny/small_model",
        "socratic_math",
    } <= set(EXPERIMENTS)


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_experiment_keeps_its_settings_when_scaled_down(experiment: str) -> None:
    """Every experiment runs in tests/test_docs.py (the docs' sweeps over all of them, scaled down): the
    scale-down used there (the bundled data, a hub model swapped for the tiny model of its family) keeps what
    the experiment pins: its optimiser, method, task and run name."""
    overrides = [f"experiment={experiment}", "trainer=debug", "task.source=bundled"]
    model = compose_config(*overrides).model
    if model.get("hub_id") and not (model.get("gguf") or model.get("architecture")):
        overrides.append(f"model={TINY_OF_FAMILY[model.family]}")
    cfg, reference = compose_config(*overrides), compose_config(f"experiment={experiment}")
    assert (cfg.optim, cfg.method, cfg.task.name, cfg.run_name) == (
        reference.optim,
        reference.method,
        reference.task.name,
        reference.run_name,
    )
    assert cfg.model.architecture or cfg.model.gguf  # buildable offline


# per-step training losses of 3 steps on tiny_llama, seed 42, the first 12 bundled GSM8K problems (batch 4),
# recorded at commit time: any change in the model build, data order, masking, dropout, loss or optimiser path
# moves them. Step 0 is the same for all: nothing has trained yet. Padding-free batches (the default) give the
# padded run's losses but one: LoRA's step 1 differs by 1.4e-5, because Adam's first update divides each
# gradient entry by its own magnitude, so float32 rounding differences (4e-8 here) in near-zero entries of the
# zero-initialised LoRA B turn into lr-sized steps; full fine-tuning agrees to every digit.
GOLDEN_LOSSES = {
    ("lora", "padded"): [5.536789, 5.554510, 5.546232],
    ("lora", "padding_free"): [5.536789, 5.554524, 5.546232],
    ("full", "padded"): [5.536789, 5.523860, 5.491010],
    ("full", "padding_free"): [5.536789, 5.523860, 5.491010],
}


@pytest.mark.parametrize(("method", "batches"), sorted(GOLDEN_LOSSES))
def test_training_reproduces_golden_losses(method: str, batches: str, tmp_path: Path) -> None:
    cfg = compose_config(
        *TINY,
        "model=tiny_llama",
        f"method={method}",
        "trainer.max_steps=3",
        "test_after_fit=false",
        "data.max_train_samples=12",
        f"data.padding_free={batches == 'padding_free'}",
    )
    with open_dict(cfg):
        cfg.paths.output_dir = str(tmp_path / "run")
    assert run(cfg)["padding_free"] is (batches == "padding_free")
    losses = [row["train/loss_step"] for row in logged_rows(tmp_path / "run") if "train/loss_step" in row]
    assert losses == pytest.approx(GOLDEN_LOSSES[method, batches], abs=1e-5, rel=0)
