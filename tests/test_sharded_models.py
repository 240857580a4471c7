"""A model spread over devices by `model.device_map` (accelerate's big-model inference), on CPU: a tiny Llama
whose `model.max_memory` leaves room for its embeddings and first block only, the rest offloaded to disk. Its
logits, evaluate.py's greedy predictions and the attention maps equal the unsharded model's; what cannot run
on it (GradSim and MEMIT, training, a fresh model) is refused by key."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from omegaconf import open_dict
from safetensors.torch import load_file

from analysis import gradsim
from analysis.attention import MAPS_FILE, analyse
from evaluation import evaluate
from modeling import models
from modeling.model_checks import ModelLoadError
from runtime import saved_run
from runtime.validate import ConfigError, check_config
from tests.conftest import compose_config

SHARDED = ["model.device_map=auto", "model.max_memory={cpu: 400KB}"]


def composed(config_name: str, saved: Path, run_dir: Path, *overrides: str):
    cfg = compose_config(
        "model=tiny_llama",
        f"model.path={saved}",
        "model.architecture=null",
        f"model.offload_folder={run_dir / 'offload'}",
        "task.source=bundled",
        "print_config=false",
        *overrides,
        config_name=config_name,
    )
    with open_dict(cfg):
        cfg.paths.output_dir, cfg.paths.cache_dir = str(run_dir), str(run_dir / "cache")
    return cfg


def test_a_sharded_model_has_the_unsharded_logits(saved_llama: Path, tmp_path: Path) -> None:
    whole, _ = models.build(composed("evaluate", saved_llama, tmp_path).model)
    sharded, _ = models.build(composed("evaluate", saved_llama, tmp_path, *SHARDED).model)
    placed = set(sharded.hf_device_map.values())
    assert placed == {"cpu", "disk"} and sharded.hf_device_map["model.layers.0"] == "cpu"
    ids = torch.tensor([[3, 40, 41, 99, 7, 12]])
    with torch.no_grad():
        torch.testing.assert_close(sharded(ids).logits, whole(ids).logits, rtol=0, atol=0)


def test_evaluate_and_attention_maps_on_a_sharded_model_equal_the_unsharded(
    saved_llama: Path, tmp_path: Path
) -> None:
    outputs = {}
    for name, extra in (("whole", []), ("sharded", SHARDED)):
        run_dir = tmp_path / name
        evaluate.run(
            composed("evaluate", saved_llama, run_dir, *extra, "limit=4", "generation.max_new_tokens=6")
        )
        predictions = (run_dir / "predictions.jsonl").read_text().splitlines()
        attention_dir = tmp_path / f"{name}_attention"
        analyse(
            composed(
                "attention",
                saved_llama,
                attention_dir,
                *extra,
                "analysis.num_problems=2",
                "analysis.save_maps=true",
            )
        )
        outputs[name] = ([json.loads(line) for line in predictions], load_file(attention_dir / MAPS_FILE))
    (rows, maps), (sharded_rows, sharded_maps) = outputs["whole"], outputs["sharded"]
    assert [r["generation"] for r in sharded_rows] == [r["generation"] for r in rows]
    assert len({r["generation"] for r in rows}) > 1
    assert sharded_maps.keys() == maps.keys() and maps
    for key, value in maps.items():
        torch.testing.assert_close(sharded_maps[key], value)


def test_what_cannot_run_on_a_sharded_model_is_refused_by_key(saved_llama: Path, tmp_path: Path) -> None:
    cfg = composed("gradsim", saved_llama, tmp_path, *SHARDED, "task=hotpotqa", "analysis.max_pieces=2")
    with pytest.raises(ValueError, match=r"model.device_map=auto: GradSim and MEMIT .* offloaded"):
        choice = saved_run.resolve(cfg)
        gradsim.coupling_stage(cfg, choice, cfg.analysis, tmp_path, {"analysis.layers": [0]})
    with pytest.raises(ConfigError, match=r"model.device_map=auto: .*trainer=fsdp"):
        check_config(composed("train", saved_llama, tmp_path, *SHARDED))
    fresh = compose_config("model=tiny_llama", "model.device_map=auto", config_name="evaluate").model
    with pytest.raises(
        ModelLoadError, match=r"model.device_map=auto: only weights loaded with from_pretrained"
    ):
        models.build(fresh)
