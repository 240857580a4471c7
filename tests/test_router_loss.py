"""The router's auxiliary loss and the expert load on mixture-of-experts models (tests/families.py MIXTURES):
the training loss equals the model's own cross-entropy plus the weighted aux loss (transformers-native and
remote code), turning it off changes the router's gradient, the expert load equals a count from the router
logits without padding, and a training run logs both and warns on imbalance."""

from __future__ import annotations

import csv
import logging
from pathlib import Path

import pytest
import torch

import datamodules
from lightning_modules.causal_lm import CausalLMModule
from modeling.experts import ExpertLoad, expert_routers
from runtime.training import run
from tests.conftest import fresh_family
from tests.families import overrides

TEXTS = [("Paris is in", "France"), ("2 + 2 is", "4"), ("Ice is very", "cold")]


def batch_of(cfg, tokenizer) -> dict[str, torch.Tensor]:
    """A padded batch of three short examples."""
    task = datamodules.build_task(cfg, tokenizer)
    return task.collate([task.tokenize(f"{p} ", a) for p, a in TEXTS])


def aux_case(name: str, minimind_dir: Path, coef: float | None = None):
    """(model, batch, CausalLMModule with aux coefficient `coef`) of a fresh mixture model."""
    cfg, model, tokenizer = fresh_family(name, minimind_dir)
    batch = batch_of(cfg, tokenizer)
    module = CausalLMModule(model, router_aux_loss_coef=coef)
    return model, batch, module


@pytest.mark.parametrize("name", ["mixtral", "minimind_moe"])
def test_the_training_loss_adds_the_weighted_router_aux_loss(minimind_dir: Path, name: str) -> None:
    model, batch, module = aux_case(name, minimind_dir)
    torch.manual_seed(0)
    loss = module._shared_step(batch, "train")
    inputs = {key: batch[key] for key in ("input_ids", "attention_mask", "labels")}
    torch.manual_seed(0)
    if name == "mixtral":  # transformers adds router_aux_loss_coef * aux_loss itself when asked for it
        expected = model(**inputs, output_router_logits=True)
        assert module.aux_weight == model.config.router_aux_loss_coef > 0
        torch.testing.assert_close(loss, expected.loss, rtol=1e-6, atol=1e-6)
    else:  # MiniMind returns aux_loss already weighted; its trainer optimises loss + aux_loss
        expected = model(**inputs)
        assert module.aux_weight == 1.0 and float(expected.aux_loss) > 0
        torch.testing.assert_close(loss, expected.loss + expected.aux_loss, rtol=1e-6, atol=1e-6)
    plain = model(**inputs).loss if name == "mixtral" else expected.loss
    assert float(loss - plain) > 0  # the aux term is there


@pytest.mark.parametrize("name", ["mixtral", "minimind_moe"])
def test_turning_the_aux_loss_off_changes_the_routers_gradient(minimind_dir: Path, name: str) -> None:
    gradients = []
    for coef in (None, 0.0):
        model, batch, module = aux_case(name, minimind_dir, coef)
        (_, router, _), *_ = expert_routers(model)
        torch.manual_seed(0)
        module._shared_step(batch, "train").backward()
        gradients.append(router.weight.grad.clone())
    assert module.aux_weight == 0.0 and module.router_inputs == {}
    assert not torch.allclose(gradients[0], gradients[1], rtol=1e-4, atol=1e-8)


def test_the_expert_load_is_the_top_k_count_of_the_router_logits(minimind_dir: Path) -> None:
    cfg, model, tokenizer = fresh_family("mixtral", minimind_dir)
    model.eval()
    input_ids = torch.randint(3, 200, (2, 9))
    load = ExpertLoad(model)
    with torch.no_grad(), load.counting():
        output = model(input_ids=input_ids, output_router_logits=True)
    assert sorted(load.counts) == [0, 1]
    for layer, logits in enumerate(output.router_logits):  # [tokens, experts] per MoE layer
        chosen = logits.topk(model.config.num_experts_per_tok, dim=-1).indices.flatten()
        expected = torch.bincount(chosen, minlength=4).float() / len(logits)  # share of the tokens
        torch.testing.assert_close(load.shares()[layer], expected)
        assert float(load.shares()[layer].sum()) == pytest.approx(2.0)  # each token picks top-2


def test_padding_is_not_counted_as_routed_tokens(minimind_dir: Path) -> None:
    cfg, model, tokenizer = fresh_family("mixtral", minimind_dir)
    batch = batch_of(cfg, tokenizer)
    load = ExpertLoad(model.eval())
    with torch.no_grad(), load.counting(batch["attention_mask"]):
        model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    real = int(batch["attention_mask"].sum())
    assert int(batch["attention_mask"].numel()) > real
    assert all(int(counts.sum()) == 2 * real for counts in load.counts.values())


def test_a_run_logs_aux_loss_and_expert_load_and_warns_on_imbalance(
    tiny_config, minimind_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    cfg = tiny_config(
        *overrides("mixtral", minimind_dir),
        "method=lora",
        "trainer.max_steps=2",
        "data.max_train_samples=8",
        "data.batch_size=4",
        "metrics.every_n_steps=1",
        "moe.imbalance_factor=1.1",  # balanced: 50% of the tokens per expert (top-2 of 4); warn above 55%
    )
    with caplog.at_level(logging.WARNING, logger="lightning_modules.causal_lm"):
        results = run(cfg)
    assert results["global_step"] == 2
    with open(next(Path(cfg.paths.output_dir).rglob("metrics.csv"))) as file:
        rows = list(csv.DictReader(file))
    assert any(row.get("train/aux_loss_step") for row in rows)
    column = "train/expert_load/layer_{}/expert_{}".format
    measured = [row for row in rows if row.get(column(0, 0))]
    assert len(measured) == 2  # every step (metrics.every_n_steps=1)
    loads = {
        layer: [[float(row[column(layer, e)]) for e in range(4)] for row in measured] for layer in (0, 1)
    }
    assert all(sum(step) == pytest.approx(2.0) for steps in loads.values() for step in steps)  # top-2
    warned = [r.getMessage() for r in caplog.records if "router may be collapsing" in r.getMessage()]
    collapsing = [layer for layer, steps in loads.items() if any(max(step) > 0.55 for step in steps)]
    assert collapsing and len(warned) == len(collapsing)  # once per layer, however many steps exceed
    assert all(f"MoE layer {layer}:" in " ".join(warned) for layer in collapsing)
