"""A trained tied embedding's gradient sent as its tokens' rows (modeling/tied_embedding.py): on every decoder
family (tied for the test), the weights' gradients equal the dense backward's and are all dense; a training
run switches it on for the causal-LM loss only, trains the weights a dense run trains, and switches it off at
the end. DDP and FSDP with it: tests/test_entrypoints.py."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from omegaconf import open_dict

import lightning_modules.base
from datamodules import IGNORE_INDEX
from modeling.supervised import supervised_output, token_loss
from modeling.tied_embedding import dense_gradient, sparse_tied_gradient
from runtime.results import logged_rows
from runtime.training import run
from tests.conftest import TINY, compose_config
from tests.families import FAMILIES, MIXTURES

TEXT = "Tom has 3 apples and eats one. How many apples are left? Tom has 2 apples left."


@contextmanager
def tied(model: torch.nn.Module) -> Iterator[None]:
    """`model` (shared with other tests) with its output layer sharing the input embedding's weight and every
    weight trainable; its own output weight and trainable flags restored after."""
    output = model.get_output_embeddings()
    own, trainable = output.weight, {p: p.requires_grad for p in model.parameters()}
    output.weight = model.get_input_embeddings().weight
    model.requires_grad_(True)
    try:
        with torch.enable_grad():
            yield
    finally:
        output.weight = own
        for parameter, flag in trainable.items():
            parameter.requires_grad_(flag)


def gradients(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Every parameter's gradient of the training loss on `batch`, the model's gradients freed after."""
    output, targets = supervised_output(model, batch)
    token_loss(output.logits, targets).backward()
    found = {name: p.grad for name, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return found


@pytest.mark.parametrize("name", sorted(FAMILIES) + sorted(MIXTURES))
def test_a_tied_embeddings_sparse_gradient_equals_the_dense_one(family_model, name: str) -> None:
    _, model, tokenizer = family_model(name)
    ids = tokenizer(TEXT, return_tensors="pt")["input_ids"][:, :40]  # [1, T], repeated tokens
    labels = ids.clone()
    labels[:, : ids.shape[1] // 2] = IGNORE_INDEX
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
    with tied(model):
        dense = gradients(model, batch)
        assert sparse_tied_gradient(model)
        try:
            assert model.get_input_embeddings().sparse
            sparse = gradients(model, batch)
        finally:
            dense_gradient(model)
    assert not model.get_input_embeddings().sparse
    assert sparse.keys() == dense.keys() and not any(grad.is_sparse for grad in sparse.values())
    for key, grad in dense.items():
        torch.testing.assert_close(sparse[key], grad, rtol=1e-5, atol=1e-7, msg=key)


def test_an_untied_or_frozen_embedding_is_left_dense(family_model) -> None:
    _, model, _ = family_model("llama")  # untied
    assert model.get_output_embeddings().weight is not model.get_input_embeddings().weight
    assert not sparse_tied_gradient(model) and not model.get_input_embeddings().sparse
    with tied(model):
        weight = model.get_input_embeddings().weight
        weight.requires_grad_(False)
        try:
            assert not sparse_tied_gradient(model) and not model.get_input_embeddings().sparse
        finally:
            weight.requires_grad_(True)


def trained(tmp_path: Path, name: str, *overrides: str) -> tuple[list[float], dict[str, torch.Tensor]]:
    """(per-step losses, final weights) of a 3-step run of a tied from-scratch model."""
    cfg = compose_config(
        *TINY,
        "model=tiny_pretrain_small",
        "method=full",
        "trainer.max_steps=3",
        "data.max_train_samples=12",
        "test_after_fit=false",
        *overrides,
    )
    with open_dict(cfg):
        cfg.paths.output_dir = str(tmp_path / name)
    results = run(cfg)
    losses = [row["train/loss_step"] for row in logged_rows(tmp_path / name) if "train/loss_step" in row]
    weights = torch.load(tmp_path / name / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    assert results["global_step"] == 3
    return losses, weights


def test_a_run_trains_the_weights_a_dense_gradient_trains(tmp_path: Path, monkeypatch) -> None:
    switched: list[tuple[str, bool]] = []

    def spy(model: torch.nn.Module) -> bool:
        switched.append((type(model).__name__, sparse_tied_gradient(model)))
        return switched[-1][1]

    def switch_back(model: torch.nn.Module) -> None:
        dense_gradient(model)
        switched.append(("back", model.get_input_embeddings().sparse))

    monkeypatch.setattr(lightning_modules.base, "sparse_tied_gradient", spy)
    monkeypatch.setattr(lightning_modules.base, "dense_gradient", switch_back)
    losses, weights = trained(tmp_path, "sparse")
    assert switched == [("LlamaForCausalLM", True), ("back", False)]
    monkeypatch.setattr(lightning_modules.base, "sparse_tied_gradient", lambda model: False)
    dense_losses, dense_weights = trained(tmp_path, "dense")
    assert losses == pytest.approx(dense_losses, rel=1e-6) and losses[0] != losses[-1]
    for key, weight in dense_weights.items():
        torch.testing.assert_close(weights[key], weight, rtol=1e-5, atol=1e-6, msg=key)
    # the classifier's head reads hidden states: its loss never reaches the output layer
    switched.clear()
    monkeypatch.setattr(lightning_modules.base, "sparse_tied_gradient", spy)
    trained(tmp_path, "classifier", "task=classification", "method=projection_head")
    assert switched == []
