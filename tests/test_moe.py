"""Mixture-of-experts and hybrid models (tests/families.py MIXTURES; every method, generation, attention maps,
GradSim and MEMIT on them: tests/test_families.py; the router's loss and load: tests/test_router_loss.py): the
structure found in them (a hybrid's attention blocks and position mixers, a shared expert's dense path),
LoRA's default targets (routers and kernel-read weights left out, fused experts adapted through peft's
target_parameters), the attention analysis of a hybrid, and GradSim on routed experts."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from peft.tuners.lora import LoraLayer, ParamWrapper
from safetensors.torch import load_file
from transformers import AutoConfig, AutoModelForCausalLM

import datamodules
from analysis import ripple
from analysis.attention import ANALYSIS_FILE, MAPS_FILE, analyse
from analysis.expert_gradients import RoutedExpertGradients, expert_blocks, expert_output_weights, routed_only
from analysis.interventions import Interventions
from lightning_modules.methods import MethodContext, lora
from modeling import architecture
from modeling.experts import ExpertLoad
from modeling.log_probs import answer_log_probs
from modeling.padding_free import keeps_sequences_apart
from runtime.strategies import LayerFSDPStrategy
from tests.conftest import built_model, composed_in, fresh_family
from tests.families import MIXTURES, REMOTE_CODE, TINY_FIELDS, overrides
from tests.remote_code import fixture_module, save_tiny_minimind

TEXTS = [("Paris is in", "France"), ("2 + 2 is", "4"), ("Ice is very", "cold")]


@pytest.mark.parametrize("name", sorted(MIXTURES))
def test_structure_is_found_in_mixtures_and_hybrids(family_model, name: str) -> None:
    _, model, _ = family_model(name)
    found, expected = architecture.structure(model), MIXTURES[name].structure
    assert (found.blocks, found.attention, found.mlp, found.mlp_output, found.mixers) == (
        expected.blocks,
        expected.attention,
        expected.mlp,
        expected.mlp_output,
        expected.mixers,
    )
    blocks = architecture.decoder_blocks(model)
    assert architecture.attention_layers(model) == ([1] if expected.mixers else [0, 1])
    assert architecture.block_classes(model) == {type(block) for block in blocks}  # FSDP wraps each kind
    mixers = [mixer for _, mixer, _ in architecture.block_parts(model)]  # where adapters go
    # a state-space or convolution layer carries state across packed examples: a hybrid trains padded (as
    # MiniMind does, which ignores position ids)
    assert keeps_sequences_apart(model) == (not expected.mixers and name not in REMOTE_CODE)
    paths = expected.mixers or ("self_attn", "self_attn")
    assert mixers == [block.get_submodule(path) for block, path in zip(blocks, paths, strict=True)]


def test_a_parallel_hybrid_block_has_attention_beside_its_state_space_mixer() -> None:
    torch.manual_seed(0)
    config = AutoConfig.for_model(
        "falcon_h1",
        **TINY_FIELDS,
        vocab_size=259,
        head_dim=16,
        mamba_n_heads=8,
        mamba_d_head=16,
        mamba_d_ssm=128,
        mamba_n_groups=1,
        mamba_d_state=8,
    )
    model = AutoModelForCausalLM.from_config(config)
    found = architecture.structure(model)  # both mix positions; the attention is the one computing weights
    assert (found.attention, found.mlp, found.mlp_output, found.mixers) == (
        "self_attn",
        "feed_forward",
        "feed_forward.down_proj",  # not the Mamba mixer's out_proj
        (),
    )


def test_the_attention_analysis_of_a_hybrid_says_which_blocks_have_none(
    minimind_dir: Path, tmp_path: Path
) -> None:
    cfg = composed_in(
        tmp_path,
        *overrides("jamba", minimind_dir),
        "analysis.text='Tom has 3 apples.'",
        "analysis.save_maps=true",
        config_name="attention",
    )
    result = analyse(cfg)
    assert (result["attention_blocks"], result["blocks_without_attention"]) == ([1], [0])
    saved = json.loads((tmp_path / "run" / ANALYSIS_FILE).read_text())
    assert saved["blocks_without_attention"] == [0]
    maps = load_file(tmp_path / "run" / MAPS_FILE)["0/standard"]  # [attention layers, H, T, T]
    assert maps.shape[:2] == (1, 4) and torch.allclose(maps.sum(-1), torch.ones_like(maps.sum(-1)), atol=1e-5)


@pytest.mark.parametrize("name", sorted(MIXTURES))
def test_lora_leaves_routers_out_and_adapts_every_expert(minimind_dir: Path, name: str) -> None:
    cfg, model, _ = fresh_family(name, minimind_dir)
    family = MIXTURES[name]
    adapted = lora.apply(model, MethodContext(model_cfg=cfg.model))
    blocks = architecture.decoder_blocks(adapted)
    wrapped = {
        path
        for block in blocks
        for path, module in block.named_modules()
        if isinstance(module, LoraLayer) and not isinstance(module, ParamWrapper)
    }
    present = {path for block in blocks for path, _ in block.named_modules()}
    assert set(family.routers) <= present and set(family.left_out) <= present
    assert wrapped and not wrapped & {*family.routers, *family.left_out}
    fused = [module for module in adapted.modules() if isinstance(module, ParamWrapper)]
    assert bool(fused) == family.fused  # fused experts through target_parameters, without dropout
    assert all(isinstance(module.lora_dropout["default"], torch.nn.Identity) for module in fused)
    modular = [m for m in adapted.modules() if isinstance(m, LoraLayer) and not isinstance(m, ParamWrapper)]
    assert all(module.lora_dropout["default"].p == cfg.method.dropout for module in modular)
    if name == "minimind_moe":  # modular experts: each expert's projections are adapted as modules
        assert {f"mlp.experts.{e}.down_proj" for e in range(4)} <= wrapped


def test_fsdp_refuses_fused_expert_adapters_and_takes_the_others(minimind_dir: Path) -> None:
    cfg, model, _ = fresh_family("mixtral", minimind_dir)
    adapted = lora.apply(model, MethodContext(model_cfg=cfg.model))
    with pytest.raises(ValueError, match=r"trainer=fsdp: .*method.target_parameters=\[\].*trainer=ddp"):
        LayerFSDPStrategy(adapted)
    cfg, model, _ = fresh_family("mixtral", minimind_dir)
    modules_only = lora.apply(model, MethodContext(model_cfg=cfg.model), target_parameters=[])
    policy = LayerFSDPStrategy(modules_only).kwargs["auto_wrap_policy"]  # one unit per decoder block
    assert policy._module_classes == {type(block) for block in architecture.decoder_blocks(model)}


def test_lora_says_when_peft_drops_dense_targets_into_the_fused_experts(
    caplog: pytest.LogCaptureFixture,
) -> None:
    torch.manual_seed(0)
    config = AutoConfig.for_model(  # a dense MLP in block 0, routed and shared experts in block 1
        "deepseek_v3",
        **TINY_FIELDS | {"num_key_value_heads": 4},
        vocab_size=259,
        n_routed_experts=4,
        num_experts_per_tok=2,
        moe_intermediate_size=32,
        first_k_dense_replace=1,
        kv_lora_rank=16,
        q_lora_rank=16,
        qk_rope_head_dim=8,
        qk_nope_head_dim=8,
        v_head_dim=16,
        n_group=1,
        topk_group=1,
    )
    with caplog.at_level(logging.WARNING, logger="lightning_modules.methods.lora"):
        adapted = lora.apply(AutoModelForCausalLM.from_config(config), MethodContext())
    dense = adapted.get_submodule("base_model.model.model.layers.0.mlp.gate_proj")
    (warning,) = [r.getMessage() for r in caplog.records if "target_parameters" in r.getMessage()]
    assert not isinstance(dense, LoraLayer) and "'gate_proj'" in warning  # what peft did, said


def routed_only_minimind(minimind_dir: Path, tmp_path: Path):
    """(config, model, tokenizer) of the MiniMind-MoE stand-in without a shared expert: routed ones only."""
    directory = save_tiny_minimind(tmp_path / "routed", use_moe=True, n_shared_experts=0)
    cfg, model, tokenizer = built_model(*overrides("minimind", minimind_dir), f"model.path={directory}")
    return cfg, model.eval(), tokenizer


@pytest.mark.parametrize("name", ["mixtral", "olmoe", "minimind_routed"])
def test_gradsim_on_routed_experts_equals_a_per_example_loop_and_follows_the_routing(
    minimind_dir: Path, tmp_path: Path, name: str
) -> None:
    if name == "minimind_routed":
        cfg, model, tokenizer = routed_only_minimind(minimind_dir, tmp_path)
    else:
        cfg, model, tokenizer = fresh_family(name, minimind_dir)
        model.eval()
    assert routed_only(model)  # no dense output projection beside the experts
    task = datamodules.build_task(cfg, tokenizer)
    examples = [task.tokenize(f"{p} ", a) for p, a in TEXTS]
    vectors = RoutedExpertGradients(model, [0, 1])(task.collate(examples))  # [3, D]
    targets = expert_output_weights(model, [0, 1])
    assert [n.rsplit(".", 1)[-1] for n, _, _ in targets] == [
        "down_proj"
    ] * 2  # the projection back, not gate/up
    load = ExpertLoad(model)
    for row, example in enumerate(examples):
        single = task.collate([example])
        model.zero_grad()
        model.requires_grad_(True)
        answer_log_probs(model, single).sum().backward()
        blocks = [expert_blocks(ws, t, [w.grad for w in ws]) for _, ws, t in targets]  # [E, out, in] each
        model.requires_grad_(False)
        torch.testing.assert_close(
            vectors[row], torch.cat([b.flatten() for b in blocks]), rtol=1e-4, atol=1e-7
        )
        # the experts with a gradient are those that the tokens whose output reaches an answer log-probability
        # were routed to: in block 0 every token but the last (later ones attend to it), in the last block
        # only the positions whose logits score an answer token
        scoring = torch.zeros_like(single["input_ids"], dtype=torch.bool)
        scoring[:, :-1] = single["labels"][:, 1:] != -100
        earlier = torch.ones_like(scoring)
        earlier[:, -1] = False
        for layer, reaching in ((0, earlier), (1, scoring)):
            with torch.no_grad(), load.counting(reaching):
                model(input_ids=single["input_ids"])
            touched = blocks[layer].flatten(1).abs().amax(1) > 0  # [E]
            assert touched.tolist() == (load.counts[layer] > 0).tolist()
    projected = RoutedExpertGradients(model, [0, 1], projection_dim=72)(task.collate(examples))
    assert projected.shape == (3, 72)  # 3x3 per expert matrix, 4 experts, 2 layers


def test_the_ripple_study_runs_on_a_mixture_without_a_dense_path(minimind_dir: Path, tmp_path: Path) -> None:
    cfg = composed_in(
        tmp_path,
        *overrides("mixtral", minimind_dir),
        "task=hotpotqa",
        "task.source=bundled",
        "analysis.gradsim.max_pieces=4",
        "analysis.num_edits=2",
        "statistics.resamples=20",
        "analysis.memit.stats.source.kind=bundled",
        "analysis.memit.stats.text_field=question",
        "analysis.memit.mom2_n_samples=32",
        "analysis.memit.v_num_grad_steps=2",
        config_name="ripple",
    )
    ripple.run(cfg)
    assert json.loads((tmp_path / "run" / "correlation_analysis.json").read_text())["layers"] == [0]
    matrix = np.load(tmp_path / "run" / "coupling_matrix.npy")
    assert matrix.shape == (4, 4) and np.allclose(np.diag(matrix), 1.0)
    experiments = json.loads((tmp_path / "run" / "ripple_experiments.json").read_text())
    assert len(experiments) == 2 and all(np.isfinite(e["delta_log_prob"]).all() for e in experiments)
    assert any(np.abs(e["delta_log_prob"]).max() > 0 for e in experiments)  # the routed experts were edited
    statistics = json.loads((tmp_path / "run" / "memit_statistics.json").read_text())
    assert sum(statistics["expert_tokens"]["0"]) == 2 * statistics["tokens"]  # top-2 routing recorded


def test_a_routed_expert_that_saw_every_probe_token_is_not_taken_for_the_mlp_output() -> None:
    """Upstream MiniMind's MoE (routed experts only, each called on its tokens, summed with index_add_): where
    the discovery probe routes every token to one expert, that expert still sees only its tokens on real
    inputs, so the MLP is the MoE layer and no MLP output projection is found (GradSim differentiates the
    experts, the causal sites read the MoE layer's output, where every token passes)."""
    code = fixture_module()
    torch.manual_seed(0)
    config = code.MiniMindConfig(vocab_size=259, use_moe=True, n_shared_experts=0, num_experts_per_tok=1)
    model = code.MiniMindForCausalLM(config).eval()
    gates = [block.mlp.gate.weight for block in model.model.layers]
    trained = [gate.detach().clone() for gate in gates]
    with torch.no_grad():
        for gate in gates:
            gate.zero_()  # equal scores: every probe token goes to the first expert
    found = architecture.structure(model)
    assert (found.mlp, found.mlp_output) == ("mlp", None) and routed_only(model)
    with torch.no_grad():
        for gate, weight in zip(gates, trained, strict=True):
            gate.copy_(weight)  # real routing: each expert sees a subset of the tokens
    hooks = Interventions(model, ("mlp",))
    with hooks.hooked():
        hooks.run(torch.randint(3, 259, (2, 9)), record={("mlp", 0)})
    assert hooks.recorded[("mlp", 0)].shape[:2] == (2, 9)
