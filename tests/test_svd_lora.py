"""SVD-adaptive LoRA: the rank from a known spectrum, the energy coverage of the full gradient, the LoRA
shapes and scaling a rank map sets, a rank map written by one run and reused by the next."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from omegaconf import open_dict
from peft.tuners.lora import LoraLayer

from lightning_modules import methods
from lightning_modules.methods import MethodContext, svd_lora
from modeling import models
from runtime.training import run
from tests.conftest import compose_config


def spectrum_matrix(singular_values: list[float], shape: tuple[int, int], seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    u = torch.linalg.qr(
        torch.randn(shape[0], len(singular_values), generator=generator, dtype=torch.float64)
    ).Q
    v = torch.linalg.qr(
        torch.randn(shape[1], len(singular_values), generator=generator, dtype=torch.float64)
    ).Q
    return u @ torch.diag(torch.tensor(singular_values, dtype=torch.float64)) @ v.T


@pytest.mark.parametrize("exact", [True, False])
def test_svd_rank_is_exact_on_a_known_spectrum(exact: bool) -> None:
    cfg = svd_lora.RankSelection(
        tau=0.95, min_rank=1, max_rank=16, oversample=10, power_iters=2, exact_below=0
    )
    # energies 50, 30, 10, 5, 3, 2 (of 100): coverage 0.50, 0.80, 0.90, 0.95 -> rank 4
    gradient = spectrum_matrix([50**0.5, 30**0.5, 10**0.5, 5**0.5, 3**0.5, 2**0.5], (120, 90))
    assert svd_lora.select_rank(gradient, cfg, exact=exact) == 4
    assert svd_lora.select_rank(gradient, replace(cfg, tau=0.9), exact=exact) == 3
    assert svd_lora.select_rank(gradient, replace(cfg, min_rank=5), exact=exact) == 5


def test_svd_coverage_uses_the_full_energy_of_the_gradient() -> None:
    cfg = svd_lora.RankSelection(
        tau=0.95, min_rank=1, max_rank=8, oversample=10, power_iters=2, exact_below=1000
    )
    flat = spectrum_matrix([1.0] * 40, (64, 48))  # top 8 of 40 equal values cover 20% of the energy
    assert svd_lora.select_rank(flat, cfg) == 8  # never reaches tau within k = max_rank
    assert svd_lora.coverage_rank(torch.tensor([3.0, 1.0]), total_energy=100.0, tau=0.95) == 2
    assert svd_lora.coverage_rank(torch.tensor([3.0, 1.0]), total_energy=10.0, tau=0.95) == 2
    assert svd_lora.coverage_rank(torch.tensor([3.0, 1.0]), total_energy=9.5, tau=0.9) == 1


def test_rank_map_sets_the_lora_shapes_and_keeps_the_scaling(tmp_path: Path) -> None:
    cfg = compose_config("model=tiny_llama", "method=svd_lora")
    names = ["model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj"]
    (tmp_path / "ranks.json").write_text(json.dumps({names[0]: 3, names[1]: 6}))
    with open_dict(cfg):
        cfg.method.rank_map = str(tmp_path / "ranks.json")
    model = methods.build(cfg.method)(models.build(cfg.model)[0], MethodContext(cfg.model))
    layers = {
        n.removeprefix("base_model.model."): m for n, m in model.named_modules() if isinstance(m, LoraLayer)
    }
    assert set(layers) == set(names)
    assert layers[names[0]].lora_A["default"].weight.shape[0] == 3
    assert layers[names[1]].lora_B["default"].weight.shape[1] == 6
    assert all(
        layer.scaling["default"] == pytest.approx(cfg.method.alpha / cfg.method.r)
        for layer in layers.values()
    )


def test_svd_lora_run_writes_a_rank_map_that_a_second_run_reuses(tiny_config, tmp_path: Path) -> None:
    first = run(
        tiny_config(
            "model=tiny_gpt2",
            "method=svd_lora",
            "method.rank_eval_steps=2",
            "method.tau=0.5",
            "trainer.max_steps=2",
            "data.max_train_samples=8",
            run_dir=tmp_path / "first",
        )
    )
    ranks = json.loads((tmp_path / "first" / "rank_map.json").read_text())
    assert (tmp_path / "first" / "rank_map.png").exists()
    assert set(ranks) == {
        f"transformer.h.{i}.{m}"
        for i in range(2)
        for m in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")
    }
    assert all(2 <= r <= 32 for r in ranks.values())
    logged = (tmp_path / "first" / "metrics" / "metrics.csv").read_text().splitlines()[0].split(",")
    assert {f"svd_lora/rank/{name}" for name in ranks} | {"svd_lora/mean_rank"} <= set(logged)
    second = run(
        tiny_config(
            "model=tiny_gpt2",
            "method=svd_lora",
            f"method.rank_map={tmp_path / 'first' / 'rank_map.json'}",
            "trainer.max_steps=2",
            "data.max_train_samples=8",
            run_dir=tmp_path / "second",
        )
    )
    assert second["trainable_params"] == first["trainable_params"]
    adapter_config = json.loads((Path(second["final_dir"]) / "adapter_config.json").read_text())
    assert adapter_config["rank_pattern"] == ranks


def test_svd_lora_without_data_or_rank_map_says_what_to_pass() -> None:
    cfg = compose_config("model=tiny_llama", "method=svd_lora")
    with pytest.raises(ValueError, match="method.rank_map="):
        methods.build(cfg.method)(models.build(cfg.model)[0], MethodContext(cfg.model))
