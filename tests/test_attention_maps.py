"""Attention maps: DiffLlama's differential map recombined as the layer does, a task's maps equal to the
model's output attentions, free-text maps that change after LoRA training and match the notebook API."""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L
import pytest
import torch
from omegaconf import open_dict
from safetensors.torch import load_file

import datamodules
from analysis.attention import MAPS_FILE, analyse, analyse_task
from analysis.attention_maps import attention_maps, differential_maps
from modeling import models
from modeling.architecture import attention_modules
from runtime.training import run as train
from tests.conftest import compose_config


def test_differential_map_recombined_like_the_layer_matches_its_output() -> None:
    L.seed_everything(0)
    model, _ = models.build(compose_config("model=tiny_diffllama").model)
    model.set_attn_implementation("eager")
    model.eval()
    attention = model.model.layers[1].self_attn
    captured = {}
    hooks = [
        attention.register_forward_hook(lambda m, a, o: captured.__setitem__("weights", o[1])),
        attention.v_proj.register_forward_hook(lambda m, a, o: captured.__setitem__("values", o)),
        attention.o_proj.register_forward_pre_hook(lambda m, a: captured.__setitem__("before_o_proj", a[0])),
    ]
    with torch.no_grad():
        model(input_ids=torch.randint(3, 259, (1, 12)))
    for hook in hooks:
        hook.remove()

    weights = captured["weights"]  # [1, H, T, T]
    heads, head_dim = weights.shape[1], attention.head_dim
    kv = model.config.num_key_value_heads
    values = captured["values"].view(1, 12, kv, head_dim).transpose(1, 2)  # [1, kv, T, d]
    lambda_full = (
        torch.exp((attention.lambda_q1 * attention.lambda_k1).sum())
        - torch.exp((attention.lambda_q2 * attention.lambda_k2).sum())
        + 0.8
        - 0.6 * torch.exp(torch.tensor(-0.3 * 1))
    )
    outputs = []
    for head in range(heads // 2):
        differential = weights[:, head] - lambda_full * weights[:, head + heads // 2]  # [1, T, T]
        pair = (head // (heads // kv)) % (kv // 2)
        value = torch.cat([values[:, pair], values[:, pair + kv // 2]], dim=-1)  # [1, T, 2d]
        mixed = differential @ value
        normed = mixed * torch.rsqrt(mixed.pow(2).mean(-1, keepdim=True) + model.config.rms_norm_eps)
        outputs.append((1 - attention.lambda_init) * normed)
    assert torch.allclose(torch.cat(outputs, dim=-1), captured["before_o_proj"], atol=1e-5)


def expected_maps(model: torch.nn.Module, input_ids: torch.Tensor, name: str) -> list[torch.Tensor]:
    """Every layer's map from the model's own `output_attentions=True`: [H, T, T] (DiffLlama: the differential
    one)."""
    with torch.no_grad():
        attentions = model(input_ids=input_ids, output_attentions=True).attentions  # per layer [1, H, T, T]
    modules = attention_modules(model)
    return [
        differential_maps(module, weights, [name])[name][0] if name != "standard" else weights[0]
        for module, weights in zip(modules, attentions, strict=True)
    ]


@pytest.mark.parametrize("model_name", ["tiny_llama", "tiny_diffllama"])
@pytest.mark.parametrize("task_name", ["classification", "socratic_math"])
def test_task_maps_equal_output_attentions_and_classes_come_from_the_task(
    task_name: str, model_name: str, tmp_path: Path
) -> None:
    cfg = compose_config(
        f"model={model_name}",
        f"task={task_name}",
        "task.source=bundled",
        "analysis.num_problems=2",
        "analysis.save_maps=true",
        config_name="attention",
    )
    L.seed_everything(0)
    model, tokenizer = models.build(cfg.model)
    task = datamodules.build_task(cfg, tokenizer)
    result = analyse_task(cfg, model, tokenizer, task, tmp_path)
    classes = {
        "classification": ["LABEL", "TEXT", "OTHER"],
        "socratic_math": ["STUDENT", "TEACHER", "OTHER"],
    }[task_name]
    assert result["classes"] == classes and result["num_problems"] == 2
    name = "diff" if model_name == "tiny_diffllama" else "standard"
    ratios = result["maps"][name]["ratio"]
    assert sum(ratios[c]["mean"] for c in classes) == pytest.approx(1.0)
    saved, described = (
        load_file(tmp_path / MAPS_FILE),
        json.loads((tmp_path / "attention_maps.json").read_text()),
    )
    for index, record in enumerate(task.records("test")[:2]):
        prompt, spans = task.attention_input(record)
        assert described["inputs"][index]["text"] == prompt
        assert set(classes[:2]) <= set(described["inputs"][index]["classes"])  # both labelled classes occur
        input_ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
        length = input_ids.shape[1]
        for layer, expected in enumerate(expected_maps(model, input_ids, name)):
            assert torch.allclose(
                saved[f"{index}/{name}"][layer], expected[:, [length - 1], :length], atol=1e-6
            )
    if task_name == "classification":
        record = task.records("test")[0]
        prompt, spans = task.attention_input(record)
        assert prompt == task.format_example(record)[0]
        assert [prompt[a:b] for a, b, label in spans if label == "LABEL"] == task.class_names
        assert [prompt[a:b] for a, b, label in spans if label == "TEXT"] == [record[task.text_column].strip()]
    else:
        record = task.records("test")[0]
        prompt, spans = task.attention_input(record)
        messages = record["messages"]
        context = messages[: max(i for i, m in enumerate(messages) if m["role"] == "assistant")]
        assert prompt == task.render(context, add_generation_prompt=True)
        for role, label in (("user", "STUDENT"), ("assistant", "TEACHER")):
            assert [prompt[a:b] for a, b, kind in spans if kind == label] == [
                m["content"] for m in context if m["role"] == role
            ]


def test_free_text_maps_change_after_lora_training_and_match_the_notebook_api(
    tiny_config, tmp_path: Path
) -> None:
    trained = train(
        tiny_config(
            "model=tiny_llama",
            "method=lora",
            "optim.lr=5e-2",
            "trainer.max_steps=4",
            "data.max_train_samples=8",
            "test_after_fit=false",
            run_dir=tmp_path / "lora",
        )
    )
    text = "Tom has 3 apples and eats 1. How many are left?"
    runs = {}
    for label, ckpt in (("base", []), ("lora", [f"ckpt={trained['run_dir']}"])):
        cfg = compose_config(
            "model=tiny_llama",
            f"analysis.text={text!r}",
            "analysis.save_maps=true",
            "analysis.layers=[0,-1]",
            *ckpt,
            config_name="attention",
        )
        with open_dict(cfg):
            cfg.paths.output_dir = str(tmp_path / label)
            cfg.paths.cache_dir = str(tmp_path / "cache")
        analyse(cfg)
        runs[label] = load_file(tmp_path / label / MAPS_FILE)["0/standard"]  # [2 layers, H, T, T]
        assert (tmp_path / label / "attention_text_0.png").stat().st_size > 5000
    described = json.loads((tmp_path / "lora" / "attention_maps.json").read_text())
    length = len(described["inputs"][0]["tokens"])
    assert described["layers"] == [0, 1] and runs["base"].shape == (2, 4, length, length)
    assert torch.allclose(runs["base"].sum(-1), torch.ones(2, 4, length), atol=1e-5)  # softmax rows
    assert (runs["lora"] - runs["base"]).abs().max() > 1e-3
    # the notebook API on the base model gives the entrypoint's maps
    L.seed_everything(42)
    model, tokenizer = models.build(compose_config("model=tiny_llama").model)
    [notebook] = attention_maps(model, tokenizer, text, layers=[-1], heads=[1, 2])
    assert (
        notebook.tokens == described["inputs"][0]["tokens"]
        and notebook.layers == [1]
        and notebook.heads == [1, 2]
    )
    assert torch.allclose(notebook.maps["standard"][0], runs["base"][1, [1, 2]], atol=1e-6)
