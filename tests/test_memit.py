"""MEMIT pinned to the reference algorithm (kmeng01/memit) with numbers, on tiny GPT-2 (Conv1D) and Llama.

Every expected value here is computed independently in the test from the formulas of analysis/memit.py's
docstring: one prompt at a time (no batching, no padding), hooks written here, float64 linear algebra.
"""

from __future__ import annotations

import pytest
import torch
from omegaconf import open_dict

from analysis import memit, memit_inputs, memit_z
from datamodules.sources import load_split
from modeling.architecture import mlp_output_modules
from tests.memit_reference import ARCHITECTURES, OTHER, REQUEST, TEMPLATES, forward, ids, subject_end, tiny


@pytest.mark.parametrize("name", ARCHITECTURES)
def test_z_loss_terms_equal_the_reference_formulas(name: str) -> None:
    model, tokenizer, hparams = tiny(name)
    layer = hparams.layers[-1]
    objective = memit_z.ZObjective(model, tokenizer, REQUEST, hparams, TEMPLATES)
    delta = torch.randn(objective.h.shape, generator=torch.Generator().manual_seed(1)) * 0.5
    with torch.no_grad():
        terms = objective.terms(delta)

    target = tokenizer(" Paris", add_special_tokens=False)["input_ids"]
    texts = [t.format(REQUEST["prompt"]) for group in TEMPLATES for t in group]
    nlls = []
    for text in texts:
        prompt = ids(tokenizer, text)
        logits, _ = forward(
            model, layer, prompt + target[:-1], subject_end(tokenizer, text, REQUEST["subject"]), delta
        )
        log_probs = logits.log_softmax(-1)
        nlls.append(
            -sum(log_probs[len(prompt) - 1 + j, token] for j, token in enumerate(target)) / len(target)
        )
    kl_text = "Marlow Ketterby is a"
    # the subject's last token, not the prompt's
    kl_position = subject_end(tokenizer, kl_text, REQUEST["subject"])
    original, _ = forward(model, layer, ids(tokenizer, kl_text), kl_position)
    edited, _ = forward(model, layer, ids(tokenizer, kl_text), kl_position, delta)
    p_orig, p_edit = original[kl_position].log_softmax(-1), edited[kl_position].log_softmax(-1)
    kl = hparams.kl_factor * (p_edit.exp() * (p_edit - p_orig)).sum()  # KL(edited || original)
    _, h = forward(
        model,
        layer,
        ids(tokenizer, REQUEST["prompt"]),
        subject_end(tokenizer, REQUEST["prompt"], REQUEST["subject"]),
    )
    weight_decay = hparams.v_weight_decay * delta.norm() / h.norm() ** 2  # ||delta|| / ||h||^2, not squared

    assert terms["nll"].item() == pytest.approx(torch.stack(nlls).mean().item(), rel=1e-5)
    assert terms["kl"].item() == pytest.approx(kl.item(), rel=1e-4, abs=1e-9)
    assert terms["weight_decay"].item() == pytest.approx(weight_decay.item(), rel=1e-5)
    assert terms["total"].item() == pytest.approx((terms["nll"] + terms["kl"] + terms["weight_decay"]).item())
    reverse = hparams.kl_factor * (p_orig.exp() * (p_orig - p_edit)).sum()
    assert abs(reverse.item() - kl.item()) > 1e-3 * kl.item()  # the test tells the two directions apart
    assert kl.item() > 0 and weight_decay.item() != pytest.approx(
        hparams.v_weight_decay * (delta.norm() / h.norm()).item() ** 2
    )


@pytest.mark.parametrize("name", ARCHITECTURES)
def test_z_optimisation_stops_on_the_total_loss_and_never_steps_on_the_last_iteration(
    name: str, monkeypatch
) -> None:
    # the reference's threshold; a tiny random model cannot reach it, so it is raised here
    assert memit_z.STOP_LOSS == 5e-2
    monkeypatch.setattr(memit_z, "STOP_LOSS", 4.5)
    model, tokenizer, hparams = tiny(name)
    with open_dict(hparams):
        hparams.v_num_grad_steps, hparams.v_lr, hparams.clamp_norm_factor, hparams.v_weight_decay = (
            60,
            1.0,
            100.0,
            1e-4,
        )
        hparams.target_prefix = ""
    # one token, edited at the last prompt token (no subject)
    request = {**REQUEST, "subject": None, "target_new": "Q"}
    trace: list[dict] = []
    memit_z.target_vector(model, tokenizer, request, hparams, TEMPLATES, trace)
    first_below = next(i for i, t in enumerate(trace) if t["total"] < memit_z.STOP_LOSS)
    assert len(trace) == first_below + 1 < 60  # reached the threshold: stopped there
    assert [t["stepped"] for t in trace] == [True] * first_below + [
        False
    ]  # updates = iterations before the stop
    assert all(t["total"] >= memit_z.STOP_LOSS for t in trace[:-1])

    # a weight-decay term that keeps the total above the threshold while the NLL is below it
    with open_dict(hparams):
        hparams.v_num_grad_steps, hparams.v_weight_decay = 30, 2e-3
    trace = []
    memit_z.target_vector(model, tokenizer, request, hparams, TEMPLATES, trace)
    assert any(t["nll"] < memit_z.STOP_LOSS for t in trace) and all(
        t["total"] >= memit_z.STOP_LOSS for t in trace
    )
    assert [t["stepped"] for t in trace] == [True] * 29 + [False]  # no stop on the NLL alone

    with open_dict(hparams):
        hparams.v_num_grad_steps, hparams.v_lr = 3, 1e-6
    trace = []
    memit_z.target_vector(model, tokenizer, request, hparams, TEMPLATES, trace)
    assert [t["stepped"] for t in trace] == [True, True, False]  # 3 iterations, 2 optimiser updates


@pytest.mark.parametrize("name", ARCHITECTURES)
def test_keys_are_the_mean_of_the_template_group_means(name: str) -> None:
    model, tokenizer, hparams = tiny(name)
    layer = hparams.layers[0]
    module = mlp_output_modules(model, [layer])[0][1]
    keys = memit.request_keys(model, tokenizer, layer, [REQUEST, OTHER], TEMPLATES)  # [in, 2]

    def key(text: str, subject: str) -> torch.Tensor:
        seen = {}
        handle = module.register_forward_pre_hook(lambda m, args: seen.setdefault("k", args[0][0].detach()))
        with torch.no_grad():
            model(torch.tensor([ids(tokenizer, text)]))
        handle.remove()
        return seen["k"][subject_end(tokenizer, text, subject)].double()

    for column, request in enumerate([REQUEST, OTHER]):
        groups = [
            torch.stack([key(t.format(request["prompt"]), request["subject"]) for t in group]).mean(0)
            for group in TEMPLATES
        ]
        expected = torch.stack(groups).mean(0)
        assert torch.allclose(keys[:, column], expected, atol=1e-5)
        flat = torch.stack(
            [key(t.format(request["prompt"]), request["subject"]) for g in TEMPLATES for t in g]
        ).mean(0)
        assert not torch.allclose(expected, flat, atol=1e-4)  # the bare prompt weighs 1/2, not 1/4


@pytest.mark.parametrize("name", ARCHITECTURES)
def test_each_layer_update_is_the_closed_form_with_the_residual_spread_over_layers_left(name: str) -> None:
    model, tokenizer, hparams = tiny(name)
    with open_dict(hparams):
        hparams.mom2_n_samples, hparams.mom2_update_weight = 30, 5.0
    texts = [r["question"] for r in load_split({"kind": "bundled", "bundled": "gsm8k"}, "train")]
    moments, info = memit_inputs.second_moments(model, tokenizer, hparams, texts, None)
    assert info["texts"] == 30 and info["tokens"] == sum(len(ids(tokenizer, t)) for t in texts[:30])
    original = {n: p.detach().clone() for n, p in model.named_parameters()}
    z = memit_z.target_vector(model, tokenizer, REQUEST, hparams, TEMPLATES)
    with memit.edited(model, tokenizer, [REQUEST], hparams, moments, TEMPLATES) as updates:
        pass
    assert all(torch.equal(p, original[n]) for n, p in model.named_parameters())  # restored bit for bit

    position = subject_end(tokenizer, REQUEST["prompt"], REQUEST["subject"])
    (_, first_module, conv1d), _ = mlp_output_modules(model, hparams.layers)
    for index, layer in enumerate(hparams.layers):
        update = updates[layer]
        if index == 1:  # the residual is re-measured after the first layer's update
            with torch.no_grad():
                first_module.weight.add_(updates[hparams.layers[0]].delta)
        _, h = forward(model, hparams.layers[-1], ids(tokenizer, REQUEST["prompt"]), position)
        assert torch.allclose(
            update.residual[:, 0], ((z - h) / (len(hparams.layers) - index)).double(), atol=1e-5
        )
        K, R, C = update.keys, update.residual, moments[layer].double()
        expected = R @ K.T @ torch.linalg.inv(hparams.mom2_update_weight * C + K @ K.T)  # [out, in]
        assert torch.allclose(update.delta.double(), expected.T if conv1d else expected, rtol=1e-5, atol=1e-7)
