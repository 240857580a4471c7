"""A layer a config names that the model does not have is refused as the model loads, naming the config
key, its value and the model's depth: MEMIT's and GradSim's layers in the ripple study and in GradSim alone,
and the attention analysis's layers (where -1 counts from the end)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from omegaconf import DictConfig, open_dict
from safetensors.torch import load_file

from analysis import attention, gradsim, ripple
from modeling.discovery import StructureError
from runtime import saved_run
from tests.conftest import compose_config


def analysis_config(config_name: str, tmp_path: Path, *overrides: str) -> DictConfig:
    cfg = compose_config("model=tiny_llama", "task.source=bundled", *overrides, config_name=config_name)
    with open_dict(cfg):
        cfg.paths.output_dir = str(tmp_path)
    return cfg


def test_memit_layers_beyond_the_depth_are_named_before_gradsim_runs(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(gradsim, "compute", lambda *args: pytest.fail("GradSim ran before the check"))
    cfg = analysis_config("ripple", tmp_path, "model.memit.layers=[0]", "analysis.memit.layers=[0,2]")
    expected = (
        "analysis.memit.layers=[0, 2]: [2] is not a layer of LlamaForCausalLM, which has 2 decoder blocks"
    )
    with pytest.raises(StructureError, match=re.escape(expected + " (layers 0..1)")):
        ripple.ripple_study(cfg, saved_run.resolve(cfg), tmp_path)


@pytest.mark.parametrize("layers", [[4], [-1]])
def test_gradsim_layers_outside_the_model_are_named(tmp_path: Path, layers: list[int]) -> None:
    cfg = analysis_config("gradsim", tmp_path, f"analysis.layers={layers}")
    with pytest.raises(StructureError, match=re.escape(f"analysis.layers={layers}: {layers} is not a layer")):
        gradsim.run(cfg)


def test_attention_layers_count_from_either_end_and_out_of_range_is_named(tmp_path: Path) -> None:
    cfg = analysis_config("attention", tmp_path / "bad", "analysis.layers=[0,-3]")
    with pytest.raises(StructureError, match=re.escape("analysis.layers=[0, -3]: [-3] ") + ".*or -1..-2"):
        attention.analyse(cfg)
    overrides = ["analysis.layers=[-1]", "analysis.num_problems=1", "analysis.save_maps=true"]
    attention.analyse(analysis_config("attention", tmp_path / "good", *overrides))
    maps = load_file(tmp_path / "good" / attention.MAPS_FILE)
    assert [tuple(m.shape[:2]) for m in maps.values()] == [(1, 4)]  # the last of 2 layers, its 4 heads
