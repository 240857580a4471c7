"""The causal analyses' intervention layer on every decoder family (tests/families.py: transformers' dense
families, the mixtures, the hybrids and the remote-code MiniMind), and on a model with a planted mechanism
(tests/fixtures/planted.py) that the analyses must find where it is."""

from __future__ import annotations

import pytest
import torch

from analysis.activation_patching import patch_problem
from analysis.attention_maps import AttentionCapture
from analysis.causal_inputs import Problem
from analysis.causal_trace import Fact, trace_fact
from analysis.intervened_generation import Greedy
from analysis.interventions import Interventions
from analysis.knockout import edges, knockout_problem, windows
from analysis.logit_lens import lens
from analysis.sites import site_modules
from modeling.architecture import attention_layers, decoder_blocks
from modeling.discovery import StructureError
from tests.families import FAMILIES, MIXTURES
from tests.fixtures.planted import copying_gpt2

ALL = sorted(FAMILIES) + sorted(MIXTURES)
TEXT = "Tom has 3 apples and eats one. How many are left?"


def _ids(tokenizer, text: str = TEXT) -> torch.Tensor:
    return torch.tensor([tokenizer(text)["input_ids"]])


@pytest.mark.parametrize("name", ALL)
def test_restoring_sites_gives_back_the_clean_or_the_corrupted_run(family_model, name: str) -> None:
    _, model, tokenizer = family_model(name)
    ids = _ids(tokenizer)
    hooks = Interventions(model, ("block",))
    first, last = 0, len(decoder_blocks(model)) - 1
    subject = torch.tensor([1, 2, 3])
    noise = torch.randn(1, 3, model.config.hidden_size, generator=torch.Generator().manual_seed(0)) * 3
    with hooks.hooked():
        clean = hooks.run(ids, record={("block", first)})
        state = hooks.recorded[("block", first)][0]
        corrupted = hooks.run(ids, noise=(subject, noise))
        everywhere = torch.arange(ids.shape[1])
        restored = hooks.run(
            ids,
            edits={("block", first): (torch.zeros_like(everywhere), everywhere, state)},
            noise=(subject, noise),
        )
        nothing = hooks.run(ids, edits={}, noise=(subject, noise))
    assert not torch.allclose(clean, corrupted)  # the noise reaches the output
    assert torch.equal(restored, clean)  # the first block's clean output at every token: the clean run
    assert torch.equal(nothing, corrupted)
    fact = Fact("f", ids[0].tolist(), [5, 6], [1, 2, 3], [])
    with hooks.hooked():
        traced = trace_fact(hooks, fact, 3.0, 2, 10, 64, torch.Generator().manual_seed(0))
    effects = traced["kinds"]["block"]["effect"]  # [layers, tokens]
    # the last block's clean state at the last prompt token is the clean prediction there
    gap = traced["clean"][0] - traced["corrupted"][0]
    assert effects[last][len(fact.prompt_ids) - 1] == pytest.approx(gap, abs=1e-5)
    # before the subject, nothing was corrupted: restoring there changes nothing
    assert effects[first][0] == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize("name", ALL)
def test_knockout_of_nothing_is_the_plain_run_and_masks_exactly_the_named_pairs(
    family_model, name: str
) -> None:
    _, model, tokenizer = family_model(name)
    ids = _ids(tokenizer)
    length = ids.shape[1]
    layers = attention_layers(model)
    capture = AttentionCapture(model, ["a1"])  # DiffLlama: its first softmax map; others: their one map
    hooks = Interventions(model, (), knockout=True)
    keys, after = [3, 4, 5], 8
    blocked = edges(keys, after, length)[None]
    try:
        with hooks.hooked():
            plain = hooks.run(ids)
            none = hooks.run(ids, knockout={layer: torch.zeros_like(blocked) for layer in layers})
            capture.layers, capture.queries, capture.keys, capture.active = (
                [],
                list(range(length)),
                length,
                True,
            )
            knocked = hooks.run(ids, knockout={layer: blocked for layer in layers})
            capture.active = False
    finally:
        capture.remove()
    assert torch.equal(none, plain)
    assert not torch.allclose(knocked[0, after:], plain[0, after:])
    assert torch.allclose(knocked[0, :after], plain[0, :after], atol=1e-5)  # earlier queries untouched
    for maps in capture.layers:
        weights = next(iter(maps.values()))  # [H, T, T]
        assert torch.all(weights[:, after:, keys] == 0)
        kept = torch.ones(length, length, dtype=torch.bool).tril() & ~blocked[0]
        assert torch.all(weights[:, kept] != 0)


@pytest.mark.parametrize("name", ALL)
def test_patching_a_prompt_into_itself_recovers_and_changes_nothing(family_model, name: str) -> None:
    _, model, tokenizer = family_model(name)
    ids = _ids(tokenizer)[0].tolist()
    problem = Problem("p", TEXT, ids, [], [7, 8, 9], None, ids, [(i, i) for i in range(len(ids))])
    hooks = Interventions(model, ("block", "mlp", "head"))
    with hooks.hooked():
        result = patch_problem(hooks, problem, batch_size=3, greedy=Greedy(3, None))
    assert result["clean"] == result["noisy"]
    generated = result["generated"]  # greedy continuations under each patch: all the noisy run's
    assert generated["clean"] == generated["noisy"] and len(generated["noisy"]) == 3
    assert generated["block"] == [generated["noisy"]] * len(decoder_blocks(model)) and "head" not in generated
    heads = model.config.num_attention_heads
    assert len(result["kinds"]["head"]["units"]) == heads * len(attention_layers(model))
    for entry in result["kinds"].values():
        assert entry["patched"] == pytest.approx([result["noisy"]] * len(entry["units"]), abs=1e-4)


@pytest.mark.parametrize("name", ALL)
def test_logit_lens_at_the_last_layer_is_the_models_next_token_distribution(family_model, name: str) -> None:
    _, model, tokenizer = family_model(name)
    ids = _ids(tokenizer)[0].tolist()
    with torch.no_grad():
        expected = model(input_ids=torch.tensor([ids])).logits[0, -1].float().softmax(-1)
    hooks = Interventions(model, ("block",))
    with hooks.hooked():
        for token in (int(expected.argmax()), 7, 100):
            read = lens(hooks, ids, token)
            assert read["probability"][-1] == pytest.approx(float(expected[token]), rel=1e-3, abs=1e-6)
            assert read["top"][-1] == int(expected.argmax())
            assert read["rank"][-1] == int((expected > expected[token]).sum())


@pytest.mark.parametrize("name", ["llama", "gpt2", "qwen2_moe", "jamba", "minimind"])
def test_patching_every_head_is_patching_the_attention_output_and_one_head_is_not(
    family_model, name: str
) -> None:
    _, model, tokenizer = family_model(name)
    clean, noisy = _ids(tokenizer), _ids(tokenizer, TEXT.replace("apples", "melons"))
    layer = attention_layers(model)[-1]
    hooks = Interventions(model, ("attention", "head"))
    everywhere = torch.arange(clean.shape[1])
    rows = torch.zeros_like(everywhere)
    with hooks.hooked():
        hooks.run(clean, record={("attention", layer), ("head", layer)})
        output, heads_input = (hooks.recorded[(kind, layer)][0] for kind in ("attention", "head"))
        attention = hooks.run(noisy, edits={("attention", layer): (rows, everywhere, output)})
        every_head = torch.ones_like(heads_input, dtype=torch.bool)
        all_heads = hooks.run(noisy, edits={("head", layer): (rows, everywhere, heads_input, every_head)})
        one_head = every_head.clone()
        one_head[:, heads_input.shape[-1] // model.config.num_attention_heads :] = False
        first_head = hooks.run(noisy, edits={("head", layer): (rows, everywhere, heads_input, one_head)})
        plain = hooks.run(noisy)
    assert torch.allclose(all_heads, attention, atol=1e-5)
    assert not torch.allclose(first_head, attention, atol=1e-5) and not torch.allclose(first_head, plain)


def test_a_site_the_model_lacks_is_refused_by_name(family_model) -> None:
    _, model, _ = family_model("llama")
    with pytest.raises(StructureError, match="analysis.sites: LlamaForCausalLM has no position mixer"):
        site_modules(model, "mixer")
    with pytest.raises(StructureError, match="unknown site kind 'residual'"):
        site_modules(model, "residual")
    _, hybrid, _ = family_model("jamba")
    assert sorted(site_modules(hybrid, "mixer")) == [0] and sorted(site_modules(hybrid, "attention")) == [1]


COPY_LAYER = 2


def _copying() -> tuple[torch.nn.Module, list[int]]:
    return copying_gpt2(layers=4, copy_layer=COPY_LAYER), [5, 3, 9, 1, 7]


def test_the_knockout_of_the_copied_token_destroys_the_answer_at_its_layer_only() -> None:
    model, prompt = _copying()
    problem = Problem("planted", "", prompt, ["NI"] + ["OC"] * 4, [5], None)
    hooks = Interventions(model, (), knockout=True)
    with hooks.hooked():
        # the "noise" is the copied first token; every later position is stopped from reading it
        result = knockout_problem(hooks, problem, windows(list(range(4)), 1), seed=0)
    scores = result["log_prob"]
    assert scores["plain"] > -0.01  # the model copies the first token
    assert scores[f"knockout/{COPY_LAYER}-{COPY_LAYER}"] < -2.0 and scores["knockout/all"] < -2.0
    for layer in set(range(4)) - {COPY_LAYER}:
        assert scores[f"knockout/{layer}-{layer}"] == scores["plain"]


def test_causal_tracing_peaks_at_the_planted_layer() -> None:
    model, prompt = _copying()
    fact = Fact("planted", prompt, [prompt[0]], [0], [])
    hooks = Interventions(model, ("block", "attention", "mlp"))
    with hooks.hooked():
        traced = trace_fact(hooks, fact, 10.0, 4, 1, 64, torch.Generator().manual_seed(0))
    gap = traced["clean"][0] - traced["corrupted"][0]
    assert gap > 0.5
    block = torch.tensor(traced["kinds"]["block"]["effect"])  # [layers, tokens]
    last = len(prompt) - 1
    # before the copy, the subject's own state carries the answer; from the copy on, the last token's
    assert block[:COPY_LAYER, 0] == pytest.approx([gap] * COPY_LAYER, abs=1e-4)
    assert block[COPY_LAYER:, 0].abs().max() < 1e-4
    assert block[COPY_LAYER:, last] == pytest.approx([gap] * (4 - COPY_LAYER), abs=1e-4)
    attention = torch.tensor(traced["kinds"]["attention"]["effect"])
    assert int(attention[:, last].argmax()) == COPY_LAYER and attention[COPY_LAYER, last] == pytest.approx(
        gap, abs=1e-4
    )
    assert attention[:, :last].abs().max() < 1e-4
    assert torch.tensor(traced["kinds"]["mlp"]["effect"]).abs().max() < 1e-6  # no MLP carries anything
