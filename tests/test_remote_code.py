"""A model that does not follow transformers' conventions (the MiniMind stand-in, loaded through
trust_remote_code from a local directory as a hub checkpoint is) gets every capability: buffers initialised at
load, prompt tuning without `inputs_embeds`, pooling without `last_hidden_state`, generation with its own
cache format, attention maps it never returns, and a zero-shot evaluate.py run. The method / GradSim / MEMIT
matrix is tests/test_families.py."""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L
import pytest
import torch
from omegaconf import open_dict
from peft import PromptTuningConfig, PromptTuningInit, get_peft_model
from safetensors.torch import load_file, save_file

from analysis.attention_maps import attention_maps
from datamodules import IGNORE_INDEX
from evaluation import evaluate
from lightning_modules.methods import MethodContext, prompt_tuning
from modeling import injection, models
from modeling.architecture import final_hidden_states
from modeling.classifier_head import SequenceClassifier
from modeling.generation import batches_continuously, truncate_at_stop
from modeling.model_checks import ModelLoadError
from tests.conftest import TINY, compose_config
from tests.helpers import greedy_without_cache
from tests.remote_code import fixture_module, save_tiny_minimind


def minimind_config(directory: Path, *extra: str):
    return compose_config(*TINY, "model=minimind2", f"model.path={directory}", *extra).model


def test_loading_computes_the_buffers_no_checkpoint_holds_every_time(minimind_dir: Path) -> None:
    config = json.loads((minimind_dir / "config.json").read_text())
    cos, sin = fixture_module().rotary_tables(
        config["head_dim"], config["max_position_embeddings"], config["rope_theta"]
    )
    ids = torch.tensor([[5, 60, 7, 80, 9]])
    logits = []
    for _ in range(3):  # transformers 5 leaves them in uninitialised memory: garbage, zeros or NaN by chance
        model, _ = models.build(minimind_config(minimind_dir))
        assert torch.equal(model.model.freqs_cos, cos) and torch.equal(model.model.freqs_sin, sin)
        with torch.no_grad():
            logits.append(model.eval()(ids).logits)
    assert all(torch.equal(logits[0], other) for other in logits[1:]) and bool(
        torch.isfinite(logits[0]).all()
    )


def test_a_model_with_non_finite_weights_is_refused_naming_them(tmp_path: Path) -> None:
    directory = save_tiny_minimind(tmp_path / "broken")
    weights = load_file(directory / "model.safetensors")
    weights["model.layers.1.mlp.down_proj.weight"][0, 0] = float("nan")
    save_file(weights, directory / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ModelLoadError, match=r"non-finite.*model\.layers\.1\.mlp\.down_proj\.weight"):
        models.build(minimind_config(directory))


def test_remote_code_stays_off_unless_the_model_config_turns_it_on(minimind_dir: Path) -> None:
    cfg = compose_config("model=hf_causal_lm", f"model.path={minimind_dir}").model
    with pytest.raises(
        ModelLoadError,
        match=r"own modelling code \(model_minimind\.py\).*trust_remote_code=true",
    ):
        models.build(cfg)


def test_prompt_tuning_at_the_embedding_layer_gives_peft_prompt_tuning_s_loss() -> None:
    """Both ways on one model that has inputs_embeds: peft's virtual tokens and the embedding-layer
    placement."""
    cfg = compose_config("model=tiny_llama").model
    L.seed_everything(0)
    base, tokenizer = models.build(cfg)
    L.seed_everything(0)
    twin, _ = models.build(cfg)
    peft_model = get_peft_model(
        base,
        PromptTuningConfig(
            task_type="CAUSAL_LM", num_virtual_tokens=5, prompt_tuning_init=PromptTuningInit.RANDOM
        ),
    )
    placed = injection.attach_embedding_prompt(twin, 5)
    vectors = injection.embedding_prompt(placed).embedding.weight
    with torch.no_grad():
        vectors.copy_(peft_model.prompt_encoder["default"].embedding.weight)
    tokenizer.padding_side = "right"
    batch = tokenizer(["Tom has 3 apples.", "2 + 2 = 4"], return_tensors="pt", padding=True)
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, IGNORE_INDEX)
    losses, gradients = [], []
    for model, weight in (
        (peft_model, peft_model.prompt_encoder["default"].embedding.weight),
        (placed, vectors),
    ):
        output = model.eval()(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=labels
        )
        output.loss.backward()
        losses.append(output.loss.detach())
        gradients.append(weight.grad.clone())
    torch.testing.assert_close(losses[0], losses[1], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(gradients[0], gradients[1], rtol=1e-5, atol=1e-7)


def test_prompt_tuning_on_minimind_places_its_vectors_before_the_input(minimind_dir: Path) -> None:
    model, tokenizer = models.build(minimind_config(minimind_dir))
    tuned = prompt_tuning.apply(
        model, MethodContext(tokenizer=tokenizer), num_virtual_tokens=3, init="text", init_text="ab"
    )
    vectors = injection.embedding_prompt(tuned).embedding.weight
    assert [n for n, p in tuned.named_parameters() if p.requires_grad] == [
        "prompt_embedding.embedding.weight"
    ]
    ids = tokenizer("Tom has", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        logits = tuned.eval()(input_ids=ids).logits  # [1, 3 + T, V]
        reference = model.model.embed_tokens.weight[tokenizer("aba", add_special_tokens=False)["input_ids"]]
    assert torch.equal(vectors, reference) and logits.shape[1] == 3 + ids.shape[1]


@pytest.mark.parametrize("extra_token", [False, True])
def test_projection_head_pools_the_final_norm_output_and_ignores_padding(
    minimind_dir: Path, extra_token: bool
) -> None:
    model, tokenizer = models.build(minimind_config(minimind_dir))
    torch.manual_seed(0)
    classifier = SequenceClassifier(
        model.requires_grad_(False), num_classes=3, extra_token=extra_token
    ).eval()
    tokenizer.padding_side = "right"
    texts = ["The match ended in a draw", "The match ended in a loss", "Shares fell"]
    batch = tokenizer(texts, return_tensors="pt", padding=True)
    with torch.no_grad():
        logits = classifier(batch["input_ids"], batch["attention_mask"])
        alone = tokenizer(texts[:1], return_tensors="pt")
        torch.testing.assert_close(classifier(alone["input_ids"], alone["attention_mask"])[0], logits[0])
        hidden = final_hidden_states(model, input_ids=alone["input_ids"])
        decoder_output, _, _ = model.model(alone["input_ids"])  # MiniMind's decoder returns a plain tuple
    assert not torch.allclose(logits[0], logits[1])
    torch.testing.assert_close(hidden, decoder_output)


def test_continuous_batching_is_kept_for_models_with_a_transformers_cache(minimind_dir: Path) -> None:
    minimind, _ = models.build(minimind_config(minimind_dir))
    llama, _ = models.build(compose_config("model=tiny_llama").model)
    assert batches_continuously(llama) and not batches_continuously(minimind)


@pytest.mark.parametrize("flash", [True, False])
def test_attention_maps_equal_softmax_of_the_same_queries_and_keys(tmp_path: Path, flash: bool) -> None:
    """MiniMind computes attention inside its own code (sdpa, or an explicit softmax) and never returns
    weights."""
    code = fixture_module()
    model, tokenizer = models.build(minimind_config(save_tiny_minimind(tmp_path / "m", flash_attn=flash)))
    text = "Tom has 3 apples and eats 1."
    [maps] = attention_maps(model, tokenizer, [text])
    ids = tokenizer(text, return_tensors="pt")["input_ids"]
    length = ids.shape[1]
    seen = {}
    attention = model.model.layers[1].self_attn
    hooks = [
        attention.q_norm.register_forward_hook(lambda m, a, o: seen.__setitem__("q", o)),
        attention.k_norm.register_forward_hook(lambda m, a, o: seen.__setitem__("k", o)),
    ]
    with torch.no_grad():
        model(ids)
    for hook in hooks:
        hook.remove()
    rotary = (model.model.freqs_cos[:length], model.model.freqs_sin[:length])
    # [1, H, T, D]
    q, k = (
        code.rotate(seen["q"], *rotary).transpose(1, 2),
        code.rotate(seen["k"], *rotary).transpose(1, 2),
    )
    k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
    scores = (q @ k.transpose(-2, -1)) / attention.head_dim**0.5
    expected = scores.masked_fill(
        torch.ones(length, length, dtype=torch.bool).triu(1), float("-inf")
    ).softmax(-1)
    assert maps.maps["standard"].shape == (2, 4, length, length)
    torch.testing.assert_close(maps.maps["standard"][1], expected[0], rtol=1e-5, atol=1e-6)


def test_zero_shot_evaluation_generates_on_minimind(minimind_dir: Path, tmp_path: Path) -> None:
    cfg = compose_config(
        "model=minimind2",
        f"model.path={minimind_dir}",
        "task.source=bundled",
        "limit=3",
        "generation.max_new_tokens=8",
        "generation.batch_size=2",
        "print_config=false",
        config_name="evaluate",
    )
    with open_dict(cfg):
        cfg.paths.output_dir = str(tmp_path)
    results = evaluate.run(cfg)
    rows = [json.loads(line) for line in (tmp_path / "predictions.jsonl").read_text().splitlines()]
    assert results["metrics"]["num_problems"] == len(rows) == 3 and "pass@1_flexible" in results["metrics"]
    model, tokenizer = models.build(cfg.model)
    stops = list(cfg.generation.stop_strings)
    assert [row["generation"] for row in rows] == [
        truncate_at_stop(greedy_without_cache(model.eval(), tokenizer, row["prompt"], 8), stops)
        for row in rows
    ]
