"""Every capability that reaches inside a model, on every decoder family of tests/families.py (fourteen that
transformers builds tiny from config fields, and the remote-code MiniMind stand-in): the structure found in
the model, the six methods trained two steps then exported and reloaded by `ckpt=`, batched generation (and
its token ids as the training forward scores them, what GRPO trains on),
attention maps, GradSim, one MEMIT edit and FSDP's wrap units. The mixture-of-experts and hybrid families
(tests/families.py MIXTURES) train every method and reload from its export, and the mixtures generate (what
else they are tested on: tests/test_moe.py). Each family's model is built once and shared."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch
from omegaconf import open_dict
from safetensors.torch import load_file

import datamodules
from analysis import gradsim, memit, memit_inputs
from analysis.attention_maps import AttentionCapture, differential_maps, prefer_eager
from analysis.memit_sites import KeyReader
from datamodules.sources import load_split
from lightning_modules.rollouts import completion_batch
from modeling import architecture, models
from modeling.classifier_head import head_scores
from modeling.generation import Decoding, batches_continuously, decode, generate
from modeling.supervised import supervised_output
from runtime import saved_run
from runtime.training import run
from tests.conftest import compose_config
from tests.families import FAMILIES, HYBRIDS, MIXTURES, REMOTE_CODE, overrides
from tests.helpers import greedy_without_cache, lm_logits

NATIVE = sorted(set(FAMILIES) - REMOTE_CODE)
# the mixtures and hybrids whose MLP has one dense output projection (a shared expert, or dense MLPs)
DENSE_PATH = sorted(name for name, family in MIXTURES.items() if family.structure.mlp_output)
METHODS = ["full", "lora", "svd_lora", "prompt_tuning", "adapter", "projection_head"]
PROMPTS = [
    "Tom has 3 apples and eats one. How many are left?",
    "2 + 2 =",
    "Once upon a time",
    "Q: 7 * 6?\nA:",
]
SHARED = "Answer in one word, as in these examples.\nQ: Colour of the sky?\nA: Blue.\n"


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_structure_is_found_in_the_model(family_model, name: str) -> None:
    _, model, _ = family_model(name)
    found = architecture.structure(model)
    expected = FAMILIES[name].structure
    assert (found.blocks, found.attention, found.mlp, found.mlp_output, found.conv1d) == (
        expected.blocks,
        expected.attention,
        expected.mlp,
        expected.mlp_output,
        expected.conv1d,
    )
    # discovered once, kept on the model
    assert not found.unresolved and architecture.structure(model) is found
    blocks = model.get_submodule(expected.blocks)
    assert architecture.block_classes(model) == {type(blocks[0])} and len(blocks) == 2  # FSDP's wrap units
    ((_, module, conv1d),) = architecture.mlp_output_modules(model, [1])
    assert module is blocks[1].get_submodule(expected.mlp_output)
    rows, columns = module.weight.shape[::-1] if conv1d else module.weight.shape  # [out, in]
    assert rows == model.config.hidden_size < columns  # from the MLP's inner width back to the hidden width


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("name", sorted(FAMILIES) + sorted(MIXTURES))
def test_method_trains_two_steps_and_reloads_from_its_export(
    tiny_config, minimind_dir: Path, tmp_path: Path, name: str, method: str
) -> None:
    task = ["task=classification"] if method == "projection_head" else []
    recorded = tmp_path / "outputs.safetensors"
    cfg = tiny_config(
        *overrides(name, minimind_dir),
        f"method={method}",
        *task,
        "trainer.max_steps=2",
        "data.max_train_samples=8",
        "method.rank_eval_steps=2" if method == "svd_lora" else "data.batch_size=4",
        "+callbacks.record._target_=tests.helpers.RecordOutputs",
        f"+callbacks.record.path={recorded}",
    )
    results = run(cfg)
    assert results["global_step"] == 2 and not results["diverged"]
    assert (results["trainable_params"] == results["total_params"]) == (method == "full")

    saved = load_file(recorded)
    batch = {key: value for key, value in saved.items() if key != "outputs"}
    eval_cfg = compose_config(
        *overrides(name, minimind_dir),
        *task,
        "task.source=bundled",
        f"ckpt={cfg.paths.output_dir}",
        config_name="evaluate",
    )
    # the same random base weights as the training run (tiny models are built from seed)
    L.seed_everything(cfg.seed)
    choice = saved_run.resolve(eval_cfg)
    model, _ = saved_run.load(choice)
    head = saved_run.load_head(model, choice)
    assert (head is not None) == (method == "projection_head")
    with torch.no_grad():
        reloaded = head_scores(head[0].eval(), batch) if head else lm_logits(model.eval(), batch)
    torch.testing.assert_close(reloaded, saved["outputs"], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", sorted(FAMILIES) + sorted(MIXTURES))
def test_batched_generation_equals_a_greedy_decode_one_prompt_at_a_time(family_model, name: str) -> None:
    _, model, tokenizer = family_model(name)
    batched = generate(model, tokenizer, PROMPTS, batch_size=2, max_new_tokens=6)
    alone = [greedy_without_cache(model, tokenizer, prompt, 6) for prompt in PROMPTS]
    assert [texts[0] for texts in batched] == alone
    if name not in REMOTE_CODE:  # transformers' own generate agrees (MiniMind's generate samples)
        tokenizer.padding_side = "left"
        for prompt, text in zip(PROMPTS, alone, strict=True):
            ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
            out = model.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=tokenizer.pad_token_id)
            assert tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True) == text


@pytest.mark.parametrize("name", sorted(FAMILIES) + sorted(MIXTURES))
def test_generated_tokens_are_those_the_training_forward_scores(family_model, name: str) -> None:
    """GRPO trains on the token ids generation drew: the training forward over prompt + completion (right
    padded, no cache) puts the greedy choice at every completion position."""
    _, model, tokenizer = family_model(name)
    drawn: dict[int, list[int]] = {}
    decode(model, tokenizer, PROMPTS, drawn.__setitem__, Decoding(batch_size=2, max_new_tokens=6))
    prompts = [tokenizer(prompt)["input_ids"] for prompt in PROMPTS]
    batch = completion_batch(prompts, [drawn[i] for i in range(len(PROMPTS))], tokenizer.pad_token_id)
    with torch.no_grad():
        output, targets = supervised_output(model, batch)
    supervised = targets != -100
    assert int(supervised.sum()) == sum(map(len, drawn.values()))
    assert torch.equal(output.logits.argmax(-1)[supervised], targets[supervised])


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_a_shared_prefix_prefilled_once_gives_the_completions_of_full_prompts(
    family_model, name: str
) -> None:
    _, model, tokenizer = family_model(name)
    prompts = [SHARED + prompt for prompt in PROMPTS]  # the few-shot case: one prefix, then each problem
    widths = []
    hook = model.register_forward_pre_hook(
        lambda _, args, kwargs: widths.append(tuple(kwargs["input_ids"].shape)), with_kwargs=True
    )
    try:
        shared = generate(model, tokenizer, prompts, batch_size=2, max_new_tokens=5)
    finally:
        hook.remove()
    full = generate(model, tokenizer, prompts, batch_size=2, max_new_tokens=5, prefix_cache=False)
    assert shared == full == [[greedy_without_cache(model, tokenizer, p, 5)] for p in prompts]
    # the prefix ran once, as one row; every later prefill holds only a prompt's own tokens
    if batches_continuously(model):
        prefix = len(tokenizer(SHARED)["input_ids"]) - 1
        assert widths[1][0] == 1 and widths[1][1] >= prefix
        assert all(length < prefix for rows, length in widths[2:] if length > 1)


@pytest.mark.parametrize("name", NATIVE + sorted(set(MIXTURES) - REMOTE_CODE))
def test_attention_maps_equal_the_weights_eager_attention_returns(family_model, name: str) -> None:
    cfg, model, tokenizer = family_model(name)
    prefer_eager(model)  # some families cannot switch: their maps are then taken at the sdpa call
    input_ids = tokenizer(PROMPTS[0], return_tensors="pt")["input_ids"]
    length = input_ids.shape[1]
    capture = AttentionCapture(model, ["diff"])
    try:
        layers = capture.run(model, input_ids, list(range(length)), length)
    finally:
        capture.remove()
    eager_cfg = cfg.model.copy()
    with open_dict(eager_cfg):
        eager_cfg.attn_implementation = "eager"
    L.seed_everything(0)  # the same weights as the shared model
    eager, _ = models.build(eager_cfg)
    with torch.no_grad():
        # per layer [1, H, T, T]
        attentions = eager.eval()(input_ids=input_ids, output_attentions=True).attentions
    attending = architecture.attention_layers(model)  # a hybrid: the blocks that have attention
    assert len(layers) == len(attending) == (1 if name in HYBRIDS else 2)
    if len(attentions) == 2:
        attentions = [attentions[i] for i in attending]
    for module, captured, weights in zip(
        architecture.attention_modules(model), layers, attentions, strict=True
    ):
        ((map_name, maps),) = captured.items()
        torch.testing.assert_close(maps, differential_maps(module, weights.float(), [map_name])[map_name][0])


@pytest.mark.parametrize("name", sorted(FAMILIES) + DENSE_PATH)
def test_gradsim_equals_a_per_example_gradient_loop(family_model, name: str) -> None:
    cfg, model, tokenizer = family_model(name)
    task = datamodules.build_task(cfg, tokenizer)
    examples = [
        task.tokenize(f"{p} ", a)
        for p, a in (("Paris is in", "France"), ("2 + 2 is", "4"), ("Ice is", "cold"))
    ]
    layers = architecture.mlp_output_layers(model)  # both, but a hybrid mixture's dense block only
    assert layers == ([0] if name == "jamba" else [0, 1])
    vectors = gradsim.PerExampleGradients(model, layers)(task.collate(examples))  # [3, D]
    modules = [module for _, module, _ in architecture.mlp_output_modules(model, layers)]
    for row, example in enumerate(examples):
        model.zero_grad()
        gradsim.answer_log_probs(model, task.collate([example])).sum().backward()
        expected = torch.cat([module.weight.grad.flatten() for module in modules])
        torch.testing.assert_close(vectors[row], expected, rtol=1e-4, atol=1e-6)
    model.zero_grad(set_to_none=True)
    model.requires_grad_(False)


@pytest.mark.parametrize("name", sorted(FAMILIES) + sorted(MIXTURES))
def test_one_memit_edit_computes_an_update_and_restores_the_weights_bit_for_bit(
    family_model, tmp_path: Path, name: str
) -> None:
    cfg, model, tokenizer = family_model(name)
    hparams = compose_config(*overrides(name, tmp_path), config_name="ripple").analysis.memit
    with open_dict(hparams):
        hparams.mom2_n_samples, hparams.v_num_grad_steps, hparams.context_templates = 32, 3, [["{}"]]
    texts = [r["question"] for r in load_split({"kind": "bundled", "bundled": "gsm8k"}, "train")]
    moments, _ = memit_inputs.second_moments(model, tokenizer, hparams, texts, None)
    request = {"prompt": "The capital of Zorbia is", "subject": "Zorbia", "target_new": "Q"}
    original = {n: p.detach().clone() for n, p in model.named_parameters()}
    site = KeyReader(model, 0)  # the dense path's output projection, or every routed expert's
    assert site.routed == (MIXTURES.get(name) is not None and MIXTURES[name].structure.mlp_output is None)
    names = {id(p): n for n, p in model.named_parameters()}
    with memit.edited(model, tokenizer, [request], hparams, moments, [["{}"]]) as updates:
        delta = updates[0].delta  # [out, in] as stored, or [E, out, in] for routed experts
        edited = torch.stack(site.matrices()) if site.routed else site.weights[0]
        assert delta.shape == edited.shape and bool(torch.isfinite(delta).all()) and delta.abs().max() > 0
        assert any(not torch.equal(w, original[names[id(w)]]) for w in site.weights)
    assert all(torch.equal(p, original[n]) for n, p in model.named_parameters())
