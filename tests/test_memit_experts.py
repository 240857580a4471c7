"""MEMIT on the routed experts of a mixture without a dense path (analysis/memit_sites.py): the keys read from
the MoE layer are the gate-weighted down-projection inputs (by Mixtral's formula, and by rebuilding the
layer's output on fused and modular experts), the update is MEMIT's closed form for the stacked experts
(pinned to the stacked solve, and exactly MEMIT with one expert per token), and an edit reaches its target
through the experts the subject is routed to only."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from omegaconf import open_dict

from analysis import memit, memit_inputs, memit_z
from analysis.memit_sites import KeyReader, expert_deltas
from datamodules.sources import load_split
from tests.conftest import TINY, built_model, compose_config
from tests.families import overrides
from tests.remote_code import save_tiny_minimind

REQUEST = {"prompt": "The capital of Zorbia is", "subject": "Zorbia", "target_new": "Q"}
TEXTS = ["The capital of Zorbia is", "Ice is cold and water is wet", "2 + 2 is 4"]


def routed_family(name: str, minimind_dir: Path, *fields: str):
    """(model in eval mode, tokenizer, MEMIT settings at layer 0) of a mixture without a dense path; `fields`
    are extra `model.architecture` entries (`key:value`)."""
    if name == "minimind_routed":  # modular experts, no shared expert
        path = save_tiny_minimind(minimind_dir.parent / "minimind_routed", use_moe=True, n_shared_experts=0)
        arguments = ["model=minimind2", f"model.path={path}", "model.memit.layers=[0]"]
    else:
        arguments = overrides(name, minimind_dir)
        arguments = [
            a.replace("}", "," + ",".join(fields) + "}")
            if a.startswith("model.architecture") and fields
            else a
            for a in arguments
        ]
    _, model, tokenizer = built_model(*TINY, *arguments)
    hparams = compose_config(*arguments, config_name="ripple").analysis.memit
    with open_dict(hparams):
        hparams.mom2_n_samples, hparams.v_num_grad_steps, hparams.context_templates = 32, 10, [["{}"]]
    return model.eval(), tokenizer, hparams


def read_keys(model, tokenizer, texts: list[str]) -> tuple[KeyReader, torch.Tensor, torch.Tensor]:
    """The reader of layer 0, its keys [E, N, T, inner] on `texts`, the MoE layer's output [N, T, hidden]."""
    reader, encoded, seen = KeyReader(model, 0), memit_inputs.batch(tokenizer, texts), {}
    handle = reader.module.register_forward_hook(
        lambda m, a, output: seen.setdefault("y", output[0] if isinstance(output, tuple) else output)
    )
    with reader.watching(), torch.no_grad():
        model(**encoded)
    handle.remove()
    shape = encoded["input_ids"].shape
    return reader, reader.keys(*shape), seen["y"].reshape(*shape, -1)


@pytest.mark.parametrize("name", ["mixtral", "olmoe", "minimind_routed"])
def test_the_keys_rebuild_the_moe_layer_output_one_expert_set_per_token(
    minimind_dir: Path, name: str
) -> None:
    model, tokenizer, _ = routed_family(name, minimind_dir)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    reader, keys, output = read_keys(model, tokenizer, TEXTS)
    assert reader.routed and keys.shape[0] == 4 and len(reader.matrices()) == 4
    rebuilt = sum(
        torch.einsum("oi,nti->nto", m.float(), k) for m, k in zip(reader.matrices(), keys, strict=True)
    )
    torch.testing.assert_close(rebuilt, output.float(), rtol=1e-4, atol=1e-6)
    assert ((keys.abs().amax(-1) > 0).sum(0) == 2).all()  # top-2 of 4 experts at every position
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())  # the probes restored them


def test_the_keys_are_mixtral_gate_weighted_down_projection_inputs(minimind_dir: Path) -> None:
    model, tokenizer, _ = routed_family("mixtral", minimind_dir)
    reader, keys, _ = read_keys(model, tokenizer, TEXTS[:1])
    moe = reader.module
    with reader.watching(), torch.no_grad():
        model(**memit_inputs.batch(tokenizer, TEXTS[:1]))
        x = reader._inputs[0][0][0]  # the MoE layer's input: [T, hidden]
        probabilities = (x @ moe.gate.weight.T).softmax(-1)
        top = probabilities.topk(2, dim=-1)
        for position in range(len(x)):
            for slot in range(2):
                expert = int(top.indices[position, slot])
                gate, up = (x[position] @ moe.experts.gate_up_proj[expert].T).chunk(2)
                expected = F.silu(gate) * up * top.values[position, slot] / top.values[position].sum()
                torch.testing.assert_close(keys[expert, 0, position], expected, rtol=1e-4, atol=1e-7)


def test_the_update_is_memit_for_the_stacked_experts_with_a_block_diagonal_second_moment() -> None:
    generator = torch.Generator().manual_seed(0)
    experts, inner, out, edits, weight = 3, 5, 4, 2, 0.7
    keys = torch.randn(experts, inner, edits, generator=generator, dtype=torch.float64)
    keys[1] = 0  # no edit is routed to expert 1
    factors = torch.randn(experts, inner, inner, generator=generator, dtype=torch.float64)
    moments = factors @ factors.transpose(1, 2) / inner + 0.1 * torch.eye(inner, dtype=torch.float64)
    residual = torch.randn(out, edits, generator=generator, dtype=torch.float64)

    deltas = expert_deltas(keys, residual, moments, weight, layer=0)  # [E, out, inner]
    stacked = keys.reshape(experts * inner, edits)  # [E * inner, n]
    expected = (
        residual @ stacked.T @ torch.linalg.inv(weight * torch.block_diag(*moments) + stacked @ stacked.T)
    )
    torch.testing.assert_close(deltas.permute(1, 0, 2).reshape(out, -1), expected, rtol=1e-9, atol=1e-12)
    assert torch.equal(deltas[1], torch.zeros(out, inner, dtype=torch.float64))
    moments[2] = 0  # a singular second moment for an expert an edit is routed to
    with pytest.raises(ValueError, match=r"layer 3 expert 2: .*singular.*analysis\.memit\.mom2_n_samples"):
        expert_deltas(keys, residual, moments, weight, layer=3)


def test_with_one_expert_per_token_the_update_is_exactly_memit_on_the_stacked_experts(
    minimind_dir: Path,
) -> None:
    model, tokenizer, hparams = routed_family("mixtral", minimind_dir, "num_experts_per_tok:1")
    texts = [r["question"] for r in load_split({"kind": "bundled", "bundled": "gsm8k"}, "train")]
    moments, info = memit_inputs.second_moments(model, tokenizer, hparams, texts, None)
    stacked = torch.zeros(4 * 128, 4 * 128, dtype=torch.float64)  # the whole stacked second moment
    for start in range(0, hparams.mom2_n_samples, 8):
        chosen = texts[start : min(start + 8, hparams.mom2_n_samples)]
        _, keys, _ = read_keys(model, tokenizer, chosen)
        real = memit_inputs.batch(tokenizer, chosen)["attention_mask"].bool()
        rows = keys[:, real].permute(1, 0, 2).reshape(int(real.sum()), -1).double()  # [N, E * inner]
        stacked += rows.T @ rows
    stacked = (stacked / info["tokens"]).float().double()  # rounded as the stored moments are
    blocks = stacked.view(4, 128, 4, 128)
    off_diagonal = ~torch.eye(4, dtype=torch.bool)
    assert blocks.permute(0, 2, 1, 3)[off_diagonal].abs().max() == 0  # one expert per token
    for expert in range(4):
        torch.testing.assert_close(
            moments[0][expert].double(), blocks[expert, :, expert], rtol=1e-5, atol=1e-9
        )

    with memit.edited(model, tokenizer, [REQUEST], hparams, moments, [["{}"]]) as updates:
        pass
    K, R = updates[0].keys.reshape(4 * 128, 1), updates[0].residual  # stacked keys [E * inner, 1]
    expected = R @ K.T @ torch.linalg.inv(hparams.mom2_update_weight * stacked + K @ K.T)  # [out, E * inner]
    delta = updates[0].delta.permute(1, 0, 2).reshape(64, -1).double()
    torch.testing.assert_close(delta, expected, rtol=1e-6, atol=1e-10)
    assert (updates[0].delta.flatten(1).abs().amax(1) > 0).sum() == 1  # the subject's one expert


def test_an_edit_reaches_its_target_through_the_routed_experts_and_is_undone(minimind_dir: Path) -> None:
    model, tokenizer, hparams = routed_family("mixtral", minimind_dir)
    texts = [r["question"] for r in load_split({"kind": "bundled", "bundled": "gsm8k"}, "train")]
    moments, _ = memit_inputs.second_moments(model, tokenizer, hparams, texts, None)
    assert moments[0].shape == (4, 128, 128)
    z = memit_z.target_vector(model, tokenizer, REQUEST, hparams, [["{}"]])
    before = memit._outputs_at_subject(model, tokenizer, 0, [REQUEST])[0]
    _, keys, _ = read_keys(model, tokenizer, [REQUEST["prompt"]])
    routed = keys[:, 0, memit_z.subject_position(tokenizer, REQUEST["prompt"], "Zorbia")].abs().amax(-1) > 0
    original = {n: p.detach().clone() for n, p in model.named_parameters()}
    with memit.edited(model, tokenizer, [REQUEST], hparams, moments, [["{}"]]) as updates:
        after = memit._outputs_at_subject(model, tokenizer, 0, [REQUEST])[0]
        changed = updates[0].delta.flatten(1).abs().amax(1) > 0  # [E]
    assert (z - after).norm() < 0.01 * (z - before).norm()  # lambda = 1 leaves 1% of the way
    assert changed.tolist() == routed.tolist() and int(routed.sum()) == 2
    assert all(torch.equal(p, original[n]) for n, p in model.named_parameters())


def test_experts_routed_fewer_statistics_tokens_than_their_key_width_are_refused_by_name(
    minimind_dir: Path,
) -> None:
    model, tokenizer, hparams = routed_family("mixtral", minimind_dir)
    with open_dict(hparams):
        hparams.mom2_n_samples = 1
    message = r"layer 0 experts \[.*\] were routed \[.*\] tokens .* key width 128; .*mom2_n_samples \(now 1\)"
    with pytest.raises(ValueError, match=message):
        memit_inputs.second_moments(model, tokenizer, hparams, TEXTS, None)
    with open_dict(hparams):
        hparams.mom2_n_samples = 32
    texts = [r["question"] for r in load_split({"kind": "bundled", "bundled": "gsm8k"}, "train")]
    _, info = memit_inputs.second_moments(model, tokenizer, hparams, texts, None)
    assert sum(info["expert_tokens"]["0"]) == 2 * info["tokens"]  # top-2: each token counted twice
