"""lmlab's GRPO and DPO losses equal TRL's (trl 1.16: `GRPOTrainer._compute_loss`, `DPOTrainer._compute_loss`)
on the same model, completions and log-probs, in float64: the loss and every parameter's gradient, for each
loss type; and the group-relative advantages equal TRL's definition (Bessel-corrected std, 1e-4 added)."""

from __future__ import annotations

import datasets
import pytest
import torch
import trl
from transformers import LlamaConfig, LlamaForCausalLM

from lightning_modules.dpo import pair_log_probs
from lightning_modules.policy_losses import GRPO_LOSS_TYPES, dpo_loss, group_advantages, grpo_loss
from lightning_modules.rollouts import completion_batch, completion_log_probs
from modeling.models import byte_level_tokenizer

TEMPERATURE, BETA, MAX_COMPLETION = 0.9, 0.04, 6
# four completions of two prompts (3 tokens each); their lengths 6, 4, 6, 2 (the rest masked)
PROMPTS = [[5, 6, 7], [5, 6, 7], [9, 10, 11], [9, 10, 11]]
COMPLETIONS = [[20, 21, 22, 23, 24, 25], [30, 31, 32, 33], [40, 41, 42, 43, 44, 45], [50, 51]]


@pytest.fixture(scope="module")
def policy() -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=259, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64,
    )  # fmt: skip
    return LlamaForCausalLM(config).double().train()


def trl_args(tmp_path, config_class, **settings):
    return config_class(output_dir=str(tmp_path), report_to=[], use_cpu=True, bf16=False, **settings)


def gradients(loss: torch.Tensor, model: torch.nn.Module) -> list[torch.Tensor]:
    return list(torch.autograd.grad(loss, [p for p in model.parameters() if p.requires_grad]))


def test_group_advantages_follow_trls_definition() -> None:
    rewards = torch.tensor([1.0, 0.0, 0.5, 0.5, 2.0, 0.0], dtype=torch.float64)
    advantages, flat = group_advantages(rewards, 2, "group")
    grouped = rewards.view(3, 2)
    mean, std = (
        grouped.mean(1, keepdim=True),
        grouped.std(1, keepdim=True),
    )  # Bessel-corrected, as trl's nanstd
    assert torch.allclose(advantages, ((grouped - mean) / (std + 1e-4)).flatten())
    assert flat.tolist() == [False, False, True, True, False, False]
    batch, _ = group_advantages(rewards, 2, "batch")
    assert torch.allclose(batch, (rewards - mean.repeat_interleave(2)) / (rewards.std() + 1e-4))
    assert torch.equal(group_advantages(rewards, 2, "none")[0], rewards - mean.flatten().repeat_interleave(2))


@pytest.mark.parametrize("loss_type", GRPO_LOSS_TYPES)
def test_grpo_loss_and_gradients_equal_trls(policy, tmp_path, loss_type: str) -> None:
    args = trl_args(
        tmp_path, trl.GRPOConfig, loss_type=loss_type, num_generations=2, per_device_train_batch_size=4,
        max_completion_length=MAX_COMPLETION, temperature=TEMPERATURE, epsilon=0.2, epsilon_high=0.28,
    )  # fmt: skip
    trainer = trl.GRPOTrainer(
        model=policy,
        reward_funcs=lambda completions, **_: [0.0] * len(completions),
        args=args,
        train_dataset=datasets.Dataset.from_dict({"prompt": ["a", "b"]}),
        processing_class=byte_level_tokenizer(),
    )
    trainer.beta, trainer.current_gradient_accumulation_steps = BETA, 1  # beta set after: no reference built
    batch = completion_batch(PROMPTS, COMPLETIONS, pad_id=0)
    with torch.no_grad():
        current, mask = completion_log_probs(policy, batch, TEMPERATURE)  # [4, 6]
    generator = torch.Generator().manual_seed(1)
    old = current + 0.5 * torch.randn(current.shape, generator=generator, dtype=torch.float64)  # some clipped
    ref = current + 0.2 * torch.randn(current.shape, generator=generator, dtype=torch.float64)
    advantages = group_advantages(torch.tensor([1.0, 0.0, 0.0, 2.0], dtype=torch.float64), 2, "group")[0]

    log_probs, _ = completion_log_probs(policy, batch, TEMPERATURE)
    ours = grpo_loss(log_probs, old, advantages, mask, loss_type, 0.2, 0.28, BETA, ref, MAX_COMPLETION)
    completion_ids = torch.tensor([c + [0] * (MAX_COMPLETION - len(c)) for c in COMPLETIONS])
    # TRL's own per-token log-probs (its fused head computes them in float32) agree with lmlab's ...
    trl_log_probs, _, _ = trainer._get_per_token_logps_and_entropies(
        policy, torch.cat([torch.tensor(PROMPTS), completion_ids], 1),
        torch.cat([torch.ones(4, 3, dtype=torch.long), mask.long()], 1), MAX_COMPLETION,
    )  # fmt: skip
    assert torch.allclose(trl_log_probs[mask].double(), log_probs[mask].detach(), atol=1e-5, rtol=0)
    # ... and its loss, fed lmlab's float64 log-probs, equals lmlab's to 1e-6, gradients included
    trainer._get_per_token_logps_and_entropies = lambda *args, **kwargs: (
        completion_log_probs(policy, batch, TEMPERATURE)[0],
        torch.zeros_like(old),
        None,
    )
    theirs = trainer._compute_loss(
        policy,
        {
            "prompt_ids": torch.tensor(PROMPTS),
            "prompt_mask": torch.ones(4, 3, dtype=torch.long),
            "completion_ids": completion_ids,
            "completion_mask": mask.long(),
            "advantages": advantages,
            "old_per_token_logps": old,
            "ref_per_token_logps": ref,
            "num_items_in_batch": mask.sum(),
        },
    )
    assert abs(ours.loss.item() - theirs.item()) < 1e-6, (ours.loss.item(), theirs.item())
    assert ours.clip_low > 0 and ours.clip_high > 0  # both sides of the clip are exercised
    for a, b in zip(gradients(ours.loss, policy), gradients(theirs, policy), strict=True):
        assert torch.allclose(a, b, atol=1e-6, rtol=0), (a - b).abs().max()


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo"])
def test_dpo_loss_and_gradients_equal_trls(policy, tmp_path, loss_type: str) -> None:
    pairs = {"prompt": ["ab"], "chosen": ["c"], "rejected": ["d"]}
    args = trl_args(tmp_path, trl.DPOConfig, loss_type=[loss_type], beta=0.3, precompute_ref_log_probs=True)
    trainer = trl.DPOTrainer(
        model=policy,
        args=args,
        train_dataset=datasets.Dataset.from_dict(pairs),
        processing_class=byte_level_tokenizer(),
    )
    # two pairs: prompts of 3 tokens, chosen responses of 4 and 2 tokens, rejected of 3 and 5
    chosen, rejected = [[20, 21, 22, 23], [30, 31]], [[40, 41, 42], [50, 51, 52, 53, 54]]
    batch = completion_batch(PROMPTS[:2] * 2, chosen + rejected, pad_id=0)
    reference = torch.tensor(
        [[-9.0, -7.5], [-6.0, -12.0]], dtype=torch.float64
    )  # [pairs, (chosen, rejected)]

    log_probs, tokens = pair_log_probs(policy, batch)
    ours, _, _ = dpo_loss(
        *log_probs.chunk(2), reference[:, 0], reference[:, 1], 0.3, loss_type, *tokens.chunk(2)
    )
    labels = batch["labels"]
    theirs = trainer._compute_loss(
        policy,
        {
            "input_ids": batch["input_ids"],
            "attention_mask": batch["attention_mask"],
            "completion_mask": (labels != -100).long(),
            "ref_chosen_logps": reference[:, 0],
            "ref_rejected_logps": reference[:, 1],
        },
        return_outputs=False,
    )
    assert abs(ours.item() - theirs.item()) < 1e-6, (ours.item(), theirs.item())
    for a, b in zip(gradients(ours, policy), gradients(theirs, policy), strict=True):  # TRL's head: float32
        assert torch.allclose(a, b, atol=1e-5, rtol=0), (a - b).abs().max()
