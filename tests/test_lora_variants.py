"""The LoRA variants (`method=lora` keys: DoRA, rsLoRA, PiSSA / OLoRA / EVA initialisation, LoRA+) and the
other peft methods (AdaLoRA, VeRA, IA3): what each computes, checked against its definition, and on every
decoder family of tests/families.py one optimiser step, then the export reloaded to the same outputs."""

from __future__ import annotations

import json
import math
from pathlib import Path

import lightning as L
import pytest
import torch
from omegaconf import open_dict

from datamodules.padding_free import model_inputs
from lightning_modules import methods
from lightning_modules.base import METHOD_STATE_KEY
from lightning_modules.task_modules import task_module_class
from modeling.model_checks import ModelLoadError
from runtime import saved_run
from runtime.training import build_trainable_model, run
from tests.conftest import TINY, compose_config
from tests.families import FAMILIES, MIXTURES, TINY_FIELDS, overrides
from tests.helpers import lm_logits
from tests.test_resume import RESUMABLE, assert_same_run, interrupted_run

FUSED = {name for name, family in MIXTURES.items() if family.fused}
# LoRA variant keys trained together (together they cover every key and init), and the other peft methods
CASES = {
    "lora_dora_rslora_pissa": [
        "method=lora",
        "method.use_dora=true",
        "method.use_rslora=true",
        "method.init=pissa_niter_2",
    ],
    "lora_eva_loraplus": [
        "method=lora",
        "method.init=eva",
        "method.r=4",
        "method.init_batches=4",
        "method.eva_tau=0.9",
        "method.loraplus_lr_ratio=4",
    ],
    "lora_olora": ["method=lora", "method.init=olora"],
    "adalora": ["method=adalora", "method.init_r=4", "method.target_r=2"],
    "vera": ["method=vera", "method.r=16"],
    "ia3": ["method=ia3"],
}


def variant_config(tmp_path: Path, *extra: str):
    """A tiny train config (tiny_llama unless `extra` names a model) with `extra` overrides, its run dir under
    `tmp_path`."""
    cfg = compose_config(*TINY, "model=tiny_llama", "data.batch_size=4", "data.max_train_samples=16", *extra)
    with open_dict(cfg):
        cfg.paths.output_dir, cfg.paths.cache_dir = str(tmp_path / "run"), str(tmp_path / "cache")
    return cfg


def trained_and_reloaded(
    cfg, family: list[str], tmp_path: Path
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Logits on a training batch before and after one optimiser step of the method (the run's own AdamW
    groups), and after the export of that step is reloaded by `ckpt=` onto a freshly built base."""
    L.seed_everything(0)
    model, tokenizer, datamodule, _ = build_trainable_model(cfg)
    datamodule.setup("fit")
    batch = next(iter(datamodule.train_dataloader()))
    module = task_module_class("causal_lm")(
        model, lr=1e-2, weight_decay=0.0, betas=(0.9, 0.99), warmup_ratio=0
    )
    optimizer = torch.optim.AdamW(module.parameter_groups())
    before = lm_logits(model.eval(), batch)
    model.train()
    model(**model_inputs(batch)).loss.backward()
    optimizer.step()
    expected = lm_logits(model.eval(), batch)
    saved_run.write_model(model, cfg.method, tmp_path / "export")
    tokenizer.save_pretrained(tmp_path / "export")
    L.seed_everything(0)
    choice = saved_run.resolve(compose_config(*family, f"ckpt={tmp_path / 'export'}", config_name="evaluate"))
    restored, _ = saved_run.load(choice)
    return before, expected, lm_logits(restored.eval(), batch)


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("name", sorted(FAMILIES) + sorted(MIXTURES))
def test_method_trains_a_step_and_its_export_reloads_to_the_same_outputs(
    minimind_dir: Path, tmp_path: Path, name: str, case: str
) -> None:
    family = overrides(name, minimind_dir)
    keys = CASES[case]
    if name in FUSED and case.startswith("lora_"):  # peft applies these to modules only: refused by key
        with pytest.raises(ValueError, match=r"method\.(use_dora|init)"):
            build_trainable_model(variant_config(tmp_path, *family, *keys))
        keys = [*keys, "method.target_parameters=[]"]
    if name == "gpt2" and case == "lora_olora":  # peft's OLoRA misreads Conv1D weights: refused by key
        with pytest.raises(ValueError, match=r"method\.init=olora: .*Conv1D"):
            build_trainable_model(variant_config(tmp_path, *family, *keys))
        return
    before, expected, reloaded = trained_and_reloaded(
        variant_config(tmp_path, *family, *keys), family, tmp_path
    )
    assert not torch.equal(expected, before)  # the step changed the outputs
    torch.testing.assert_close(reloaded, expected, rtol=1e-5, atol=1e-5)


def adapted_linear(tmp_path: Path, *keys: str) -> tuple[torch.nn.Module, torch.Tensor]:
    """tiny_llama's first q_proj under method=lora with `keys` (its trainable weights moved off their
    initial values), and an input for it."""
    L.seed_everything(0)
    model, _, _, _ = build_trainable_model(variant_config(tmp_path, "method=lora", "method.dropout=0", *keys))
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    with torch.no_grad():
        for parameter in layer.parameters():
            if parameter.requires_grad:
                parameter.add_(torch.randn_like(parameter) * 0.1)
    return layer.eval(), torch.randn(3, layer.in_features)


def test_dora_forward_is_the_magnitude_times_the_normalised_updated_weight(tmp_path: Path) -> None:
    layer, x = adapted_linear(tmp_path, "method.use_dora=true", "method.r=4", "method.alpha=8")
    weight, a, b = layer.base_layer.weight, layer.lora_A["default"].weight, layer.lora_B["default"].weight
    magnitude = layer.lora_magnitude_vector["default"].weight  # [out]
    updated = weight + 8 / 4 * b @ a  # [out, in]
    expected = x @ (magnitude[:, None] * updated / updated.norm(dim=1, keepdim=True)).T
    torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)


def test_rslora_scales_by_alpha_over_the_square_root_of_the_rank(tmp_path: Path) -> None:
    layer, x = adapted_linear(tmp_path, "method.use_rslora=true", "method.r=4", "method.alpha=8")
    weight, a, b = layer.base_layer.weight, layer.lora_A["default"].weight, layer.lora_B["default"].weight
    assert layer.scaling["default"] == pytest.approx(8 / math.sqrt(4))
    torch.testing.assert_close(layer(x), x @ weight.T + 8 / 2 * x @ a.T @ b.T, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("init", ["pissa", "pissa_niter_4", "olora"])
def test_residual_inits_leave_the_initial_model_equal_to_the_base(tmp_path: Path, init: str) -> None:
    base_cfg = variant_config(tmp_path, "method=full")
    L.seed_everything(0)
    base, _, datamodule, _ = build_trainable_model(base_cfg)
    datamodule.setup("fit")
    batch = next(iter(datamodule.train_dataloader()))
    L.seed_everything(0)
    model, _, _, _ = build_trainable_model(variant_config(tmp_path, "method=lora", f"method.init={init}"))
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    original = base.model.layers[0].self_attn.q_proj.weight
    assert not torch.allclose(layer.base_layer.weight, original, atol=1e-3)  # the base holds a residual
    assert layer.lora_B["default"].weight.abs().sum() > 0  # the adapter starts from the weight's factors
    torch.testing.assert_close(
        lm_logits(model.eval(), batch), lm_logits(base.eval(), batch), rtol=0, atol=1e-5
    )


def test_eva_starts_each_a_from_orthonormal_directions_of_its_inputs(tmp_path: Path) -> None:
    keys = ["method.r=4", "method.init_batches=4", "method.eva_tau=0.9"]
    L.seed_everything(0)
    model, _, _, _ = build_trainable_model(variant_config(tmp_path, "method=lora", "method.init=eva", *keys))
    L.seed_everything(0)
    plain, _, _, _ = build_trainable_model(variant_config(tmp_path, "method=lora", *keys))
    layers = [module for module in model.modules() if hasattr(module, "lora_A")]
    for layer in layers:
        a = layer.lora_A["default"].weight  # [rank, in]: rows are input directions
        torch.testing.assert_close(a @ a.T, torch.eye(a.shape[0]), rtol=0, atol=1e-4)
        assert layer.lora_B["default"].weight.abs().sum() == 0  # the model starts as the base
    plain_a = next(module for module in plain.modules() if hasattr(module, "lora_A")).lora_A["default"].weight
    assert not torch.allclose(plain_a @ plain_a.T, torch.eye(plain_a.shape[0]), atol=1e-2)  # not by chance


def test_loraplus_trains_b_at_the_ratio_times_the_learning_rate(tmp_path: Path) -> None:
    L.seed_everything(0)
    cfg = variant_config(tmp_path, "method=lora", "method.loraplus_lr_ratio=16", "optim.lr=1e-3")
    model, _, _, _ = build_trainable_model(cfg)
    module = task_module_class("causal_lm")(
        model, lr=1e-3, weight_decay=0.1, betas=(0.9, 0.99), warmup_ratio=0
    )
    rate = {id(p): group["lr"] for group in module.parameter_groups() for p in group["params"]}
    for name, parameter in model.named_parameters():
        if parameter.requires_grad:
            assert rate[id(parameter)] == pytest.approx(1.6e-2 if "lora_B" in name else 1e-3), name
    plain, _, _, _ = build_trainable_model(variant_config(tmp_path, "method=lora"))
    module = task_module_class("causal_lm")(
        plain, lr=1e-3, weight_decay=0.1, betas=(0.9, 0.99), warmup_ratio=0
    )
    assert {group["lr"] for group in module.parameter_groups()} == {1e-3}


@pytest.mark.parametrize(
    "keys, message",
    [
        (["method.init=spectral"], r"method\.init='spectral': expected one of"),
        (["method.init=loftq"], r"method\.init=loftq .* model\.quantization=nf4"),
        (["method.loraplus_lr_ratio=0"], r"method\.loraplus_lr_ratio=0"),
        # fewer response tokens in a batch than components: peft would cycle the batches forever
        (["task=classification", "method.init=eva", "method.r=32"], r"eva estimates 64 components .* only"),
        (["method.init=eva", "method.eva_tau=1.0", "method.eva_max_passes=1"], r"did not converge"),
    ],
)
def test_bad_variant_keys_are_refused_by_name(tmp_path: Path, keys: list[str], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        build_trainable_model(variant_config(tmp_path, "method=lora", *keys))


def test_adalora_penalty_is_what_peft_adds_to_a_loss_from_labels(tmp_path: Path) -> None:
    L.seed_everything(0)
    model, _, datamodule, _ = build_trainable_model(variant_config(tmp_path, "method=adalora"))
    datamodule.setup("fit")
    batch = next(iter(datamodule.train_dataloader()))
    nudge = {name: torch.randn_like(p) * 0.1 for name, p in model.named_parameters() if p.requires_grad}
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name in nudge:
                parameter.add_(nudge[name])
    model.train()
    torch.manual_seed(1)
    with_penalty = model(**model_inputs(batch)).loss  # peft adds its penalty to a loss from labels
    config = model.peft_config["default"]
    config.orth_reg_weight, weight = 0.0, config.orth_reg_weight
    torch.manual_seed(1)  # the same dropout masks
    plain = model(**model_inputs(batch)).loss
    config.orth_reg_weight = weight
    penalty = methods.training_hooks(model).regulariser()
    assert penalty > 0
    torch.testing.assert_close(penalty, with_penalty - plain, rtol=1e-5, atol=1e-6)


ADALORA = [
    "method=adalora",
    "method.init_r=6",
    "method.target_r=2",
    "method.tinit=2",
    "method.tfinal=3",
    "method.delta_t=2",
]


def test_adalora_prunes_to_the_target_mean_rank_writes_its_map_and_resumes_exactly(
    tiny_config, tmp_path: Path
) -> None:
    overrides = [*RESUMABLE, *ADALORA]  # 15 optimiser steps: pruning from step 2 to step 12
    straight = run(tiny_config(*overrides, run_dir=tmp_path / "straight"))
    ranks = json.loads((tmp_path / "straight" / "rank_map.json").read_text())
    assert ranks and set(ranks.values()) <= set(range(7)) and len(set(ranks.values())) > 1  # moved apart
    assert sum(ranks.values()) == 2 * len(ranks)  # the budget: target_r on average
    assert (tmp_path / "straight" / "rank_map.png").exists()
    last = interrupted_run(tiny_config, overrides, tmp_path / "interrupted", 7)  # mid-pruning, mid-epoch
    state = torch.load(last, weights_only=True)[METHOD_STATE_KEY]
    assert state["exp_avg_ipt"]  # the importance scores travel with the checkpoint
    resumed = run(tiny_config(*overrides, f"ckpt_path={last}", run_dir=tmp_path / "resumed"))
    assert_same_run(straight, resumed)
    assert json.loads((tmp_path / "resumed" / "rank_map.json").read_text()) == ranks


@pytest.mark.parametrize(
    "keys, message",
    [
        (["model.quantization=nf4"], r"model\.quantization=nf4: .*(bitsandbytes|CUDA)"),
        (["model.quantization=int4"], r"model\.quantization='int4': expected one of"),
    ],
)
def test_quantization_is_refused_by_key_where_it_cannot_apply(
    tmp_path: Path, saved_llama: Path, keys: list[str], message: str
) -> None:
    # a pretrained model (model.path) on this CPU-only machine: bitsandbytes' kernels need CUDA
    with pytest.raises(ModelLoadError, match=message):
        build_trainable_model(
            variant_config(
                tmp_path, "method=lora", f"model.path={saved_llama}", "model.architecture=null", *keys
            )
        )
    with pytest.raises(ModelLoadError, match=r"model\.quantization=nf4: .*model\.architecture"):
        build_trainable_model(variant_config(tmp_path, "method=lora", "model.quantization=nf4"))


# families whose default LoRA must leave a linear map out: peft refuses FalconMamba's mixer out_proj (its
# fused kernel path); DeepSeek-V4's grouped output projection is a Linear whose forward is block-diagonal
LEFT_OUT = {"falcon_mamba": "mixer.out_proj", "deepseek_v4": "self_attn.o_a_proj"}


@pytest.mark.parametrize("name", sorted(LEFT_OUT))
def test_default_lora_leaves_out_what_it_cannot_adapt_then_trains_and_reloads(
    tmp_path: Path, name: str
) -> None:
    left_out = LEFT_OUT[name]
    scratch = ",".join(f"{key}:{value}" for key, value in {"model_type": name, **TINY_FIELDS}.items())
    family = [
        "model=hf_causal_lm",
        f"model.name=tiny_{name}",
        "model.tokenizer=byte",
        f"model.architecture={{{scratch}}}",
    ]
    cfg = variant_config(tmp_path, *family, "method=lora")
    L.seed_everything(0)
    model, _, _, _ = build_trainable_model(cfg)
    adapted = {name.split(".lora_A")[0] for name, _ in model.named_parameters() if ".lora_A" in name}
    assert adapted and not any(path.endswith(left_out) for path in adapted)
    before, expected, reloaded = trained_and_reloaded(cfg, family, tmp_path)
    assert not torch.equal(expected, before)
    torch.testing.assert_close(reloaded, expected, rtol=1e-5, atol=1e-5)
