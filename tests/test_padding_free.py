"""Padding-free batches (datamodules/padding_free.py): the same examples, loss and gradients as padded batches
on every family that packs, attention kept inside each example, a padded fallback where a model cannot
pack, and batches grouped by length (data.group_by_length)."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch

import datamodules
from datamodules.base import EpochSeededSampler, batch_size, batch_tokens
from datamodules.padding_free import model_inputs
from modeling.padding_free import keeps_sequences_apart
from runtime.training import build_trainable_model, run
from tests.families import FAMILIES, REMOTE_CODE


def loss_and_gradients(model: torch.nn.Module, batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    loss = model(**model_inputs(batch)).loss
    loss.backward()
    gradients = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return loss.detach(), gradients


# the families that keep packed sequences apart; OPT does not honour the position ids of a packed row, and
# BLOOM's ALiBi bias depends on where a sequence sits in the row (equal only to float32 rounding that grows
# with its length)
PACKS = sorted(set(FAMILIES) - REMOTE_CODE - {"opt", "bloom"})


@pytest.mark.parametrize("name", sorted(set(FAMILIES) - REMOTE_CODE))
def test_a_packed_batch_has_the_padded_batch_s_loss_and_gradients(family_model, name: str) -> None:
    cfg, model, tokenizer = family_model(name)
    task = datamodules.build_task(cfg, tokenizer)
    examples = task.tokenize_all(task.records("train")[:4], "train")  # four lengths
    assert len({len(e["input_ids"]) for e in examples}) > 1
    padded = task.collate(examples)
    task.padding_free = True
    packed = task.collate(examples)
    assert (
        packed["input_ids"].shape == (1, sum(len(e["input_ids"]) for e in examples))
        and "attention_mask" not in packed
    )
    assert (
        (batch_size(packed), batch_tokens(packed))
        == (batch_size(padded), batch_tokens(padded))
        == (4, int(padded["attention_mask"].sum()))
    )
    model.requires_grad_(True)
    try:
        loss, gradients = loss_and_gradients(model, padded)
        packed_loss, packed_gradients = loss_and_gradients(model, packed)
        worst = max((packed_gradients[k] - g).abs().max().item() for k, g in gradients.items())
        assert keeps_sequences_apart(model) == (name in PACKS)
        if name not in PACKS:  # the check is right to refuse: packing would change the run
            assert abs(packed_loss - loss) > 1e-6 or worst > 1e-5
            return
        assert abs(packed_loss - loss) < 1e-5 and worst < 1e-5 and gradients.keys() == packed_gradients.keys()
        # the control: an all-ones mask passed alongside makes transformers skip its packed-sequence
        # detection, so attention leaks across examples and the loss moves by more than the tolerance above:
        # this test sees a leak
        leaking = {**packed, "attention_mask": torch.ones_like(packed["input_ids"])}
        with torch.no_grad():
            assert abs(model(**model_inputs(leaking)).loss - loss) > 1e-5
    finally:
        model.requires_grad_(False)


def test_a_model_that_ignores_position_ids_trains_on_padded_batches_and_says_so(
    tiny_config, minimind_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    cfg = tiny_config("model=minimind2", f"model.path={minimind_dir}", "method=lora", "trainer.max_steps=1")
    with caplog.at_level(logging.INFO):
        model, _, datamodule, _ = build_trainable_model(cfg)
    assert not keeps_sequences_apart(model) and not datamodule.task.padding_free
    assert "data.padding_free: MiniMindForCausalLM does not keep packed examples apart" in caplog.text


@pytest.mark.parametrize(("method", "packed"), [("lora", True), ("prompt_tuning", False), ("adapter", True)])
def test_runs_record_whether_their_batches_were_padding_free(tiny_config, method: str, packed: bool) -> None:
    """peft's prompt tuning drops position ids: the check finds it, and the run pads."""
    results = run(
        tiny_config("model=tiny_llama", f"method={method}", "trainer.max_steps=2", "data.max_train_samples=8")
    )
    assert results["padding_free"] is packed and results["global_step"] == 2


def test_a_task_whose_batches_do_not_pack_stays_padded(tiny_config) -> None:
    results = run(
        tiny_config("model=tiny_llama", "task=classification", "method=lora", "trainer.max_steps=1")
    )
    assert results["padding_free"] is False


def test_group_by_length_batches_similar_lengths_and_keeps_the_seeded_order(tiny_config) -> None:
    lengths = [int(n) for n in torch.randint(10, 400, (1000,), generator=torch.Generator().manual_seed(0))]
    grouped = list(EpochSeededSampler(1000, seed=3, batch_size=8, lengths=lengths))
    plain = list(EpochSeededSampler(1000, seed=3, batch_size=8))
    assert sorted(grouped) == sorted(plain) == list(range(1000)) and grouped != plain
    assert lengths[grouped[0]] == max(lengths)  # the longest batch first
    # seeded: resumable
    assert grouped == list(EpochSeededSampler(1000, seed=3, batch_size=8, lengths=lengths))

    def padding(order: list[int]) -> float:
        batches = [order[i : i + 8] for i in range(0, len(order), 8)]
        return sum(8 * max(lengths[i] for i in b) - sum(lengths[i] for i in b) for b in batches) / sum(
            lengths
        )

    assert padding(grouped) < padding(plain) / 10
    resumed = EpochSeededSampler(1000, seed=3, batch_size=8, lengths=lengths, start_batch=5)
    assert list(resumed) == grouped[40:]
