"""The training step computes only what the loss needs. The output layer on supervised positions only
(modeling/supervised.py) gives the loss and the gradients of the model's own `labels=` loss over every
position, to 1e-6 in float32: padded and packed, on every family of the test matrix, and with a method that
prepends virtual tokens. AdamW runs fused where the device has the kernel, and the gradients are freed right
after each optimiser step. A batch's FLOPs equal a hand count.
"""

from __future__ import annotations

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader

from datamodules import IGNORE_INDEX
from datamodules.padding_free import model_inputs, one_row
from lightning_modules.base import adamw_kernel
from lightning_modules.causal_lm import CausalLMModule
from lightning_modules.classifier import ClassifierModule
from lightning_modules.methods import MethodContext, prompt_tuning
from lightning_modules.task_modules import task_module_class
from modeling import packed_attention
from modeling.flops import batch_flops, flop_counts, measured_peak_flops
from modeling.log_probs import answer_log_probs
from modeling.packed_attention import attends_per_example, same_logits
from modeling.padding_free import keeps_sequences_apart
from modeling.supervised import kept_positions, supervised_logits, token_loss
from runtime.training import build_trainable_model
from tests.conftest import TINY, built_model
from tests.families import FAMILIES, overrides

PROMPT, ANSWER = [5, 9, 13, 7, 21, 4], [8, 30, 2]
EXAMPLES = [  # prompt masked, loss on the answer; the second is longer, so the first is padded
    {"input_ids": PROMPT + ANSWER, "labels": [IGNORE_INDEX] * len(PROMPT) + ANSWER},
    {"input_ids": [3, *PROMPT, 11, *ANSWER, 6], "labels": [IGNORE_INDEX] * 8 + [*ANSWER, 6]},
]


def padded(examples: list[dict[str, list[int]]]) -> dict[str, torch.Tensor]:
    """Right-padded [B, T] input_ids / attention_mask / labels."""
    width = max(len(e["input_ids"]) for e in examples)
    rows = {"input_ids": [], "attention_mask": [], "labels": []}
    for example in examples:
        pad = width - len(example["input_ids"])
        rows["input_ids"].append(example["input_ids"] + [0] * pad)
        rows["attention_mask"].append([1] * len(example["input_ids"]) + [0] * pad)
        rows["labels"].append(example["labels"] + [IGNORE_INDEX] * pad)
    return {name: torch.tensor(value) for name, value in rows.items()}


def loss_and_gradients(model: torch.nn.Module, batch: dict, kept: bool) -> tuple[torch.Tensor, list]:
    """The loss of `batch` and the gradients it gives every trainable parameter: on the kept positions, or
    the model's own loss over all positions."""
    model.zero_grad()
    loss = token_loss(*supervised_logits(model, batch)) if kept else model(**model_inputs(batch)).loss
    loss.backward()
    gradients = [p.grad.clone() for p in model.parameters() if p.grad is not None]
    model.zero_grad()
    return loss.detach(), gradients


def assert_same(model: torch.nn.Module, batch: dict) -> None:
    loss, gradients = loss_and_gradients(model, batch, kept=True)
    reference, reference_gradients = loss_and_gradients(model, batch, kept=False)
    assert torch.isfinite(loss) and abs(loss - reference) <= 1e-6
    assert len(gradients) == len(reference_gradients) > 0
    for ours, theirs in zip(gradients, reference_gradients, strict=True):
        torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-6)


def test_kept_positions_are_those_whose_next_token_is_a_target_in_some_row() -> None:
    labels = padded(EXAMPLES)["labels"]  # [2, 12]: targets at 6..8 in row 0, 8..11 in row 1
    assert kept_positions(labels).tolist() == [t - 12 for t in (5, 6, 7, 8, 9, 10)]
    assert kept_positions(torch.full((2, 5), IGNORE_INDEX)).numel() == 0


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_loss_and_gradients_on_kept_positions_equal_the_models_own(minimind_dir, name: str) -> None:
    _, model, _ = built_model(*TINY, *overrides(name, minimind_dir))  # its own: attention may switch
    assert_same(model, padded(EXAMPLES))
    # on every family whose attention goes through transformers' interface; on the others only if a probe of
    # the model shows its attention ran example by example and matched the dense mask
    assert attends_per_example(model) or not FAMILIES[name].per_example
    if keeps_sequences_apart(model):  # packed, attending per example where the model allows it
        assert_same(model, one_row(EXAMPLES))
        with torch.no_grad():
            packed, whole = (
                token_loss(*supervised_logits(model, b)) for b in (one_row(EXAMPLES), padded(EXAMPLES))
            )
        assert abs(packed - whole) <= 1e-5
    # the output layer itself runs at the K kept positions, not at all T = 12
    rows = []
    hook = model.get_output_embeddings().register_forward_hook(lambda m, args, out: rows.append(out.shape[1]))
    try:
        logits, targets = supervised_logits(model, padded(EXAMPLES))
    finally:
        hook.remove()
    assert rows == [6] and logits.shape[:2] == targets.shape == (2, 6)


def test_kept_positions_skip_the_virtual_tokens_of_prompt_tuning() -> None:
    _, model, _ = built_model(*TINY, "model=tiny_llama")
    tuned = prompt_tuning.apply(model, MethodContext(), num_virtual_tokens=4)
    assert_same(tuned, padded(EXAMPLES))


def test_adamw_is_fused_where_the_device_has_the_kernel_and_foreach_elsewhere() -> None:
    on_cpu = [torch.nn.Parameter(torch.randn(4, 4)), torch.nn.Parameter(torch.randn(4))]
    assert adamw_kernel(on_cpu) == {"fused": True}
    assert adamw_kernel([torch.nn.Parameter(torch.empty(4, 4, device="meta"))]) == {"foreach": True}
    # Lightning's mixed precision refuses to clip gradients for a fused optimiser
    assert adamw_kernel(on_cpu, amp_clips=True) == {"foreach": True}
    # the module's optimiser: fused over the trainable weights of a tiny model on this CPU
    _, model, _ = built_model(*TINY, "model=tiny_llama")
    module = CausalLMModule(model)
    settings = {"estimated_stepping_batches": 10, "precision_plugin": None, "gradient_clip_val": 1.0}
    module._trainer = type("Trainer", (), settings)()
    optimizer = module.configure_optimizers()["optimizer"]
    assert optimizer.defaults["fused"] is True and not optimizer.defaults["foreach"]


@pytest.mark.parametrize("accumulate", [1, 2])
def test_gradients_are_freed_after_the_optimiser_step_not_held_through_the_next_forward(
    tiny_config, accumulate: int
) -> None:
    cfg = tiny_config("model=tiny_llama", "method=full", f"trainer.accumulate_grad_batches={accumulate}")
    model, _, datamodule, _ = build_trainable_model(cfg)
    datamodule.setup("fit")
    batch = next(iter(datamodule.train_dataloader()))
    held = []  # per training forward: whether any parameter still holds a gradient
    model.register_forward_pre_hook(
        lambda m, _: held.append(any(p.grad is not None for p in m.parameters())) if m.training else None
    )
    module = task_module_class("causal_lm")(model, **cfg.optim)
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=3,
        accumulate_grad_batches=accumulate,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
    )
    trainer.fit(module, train_dataloaders=DataLoader([batch] * 3 * accumulate, batch_size=None))
    # a micro-batch after the first of an accumulation still sees the gradients it adds to
    assert held == [False, *[True] * (accumulate - 1)] * 3
    assert all(p.grad is None for p in model.parameters())


def test_the_probe_tells_rounding_from_attention_across_examples() -> None:
    dense = torch.tensor([[30.0, -2.0, 0.5]])
    rounded = dense + torch.tensor([[3e-5, -3e-5, 2e-5]])  # 1e-6 of the scale: a 30-layer float32 model
    leaked = dense + torch.tensor([[0.0, 0.9, 0.0]])  # 3% of it
    assert same_logits(rounded, dense, torch.float32) and not same_logits(leaked, dense, torch.float32)
    # bfloat16 rounds at 2^-8: the same 3% is rounding there, 10% is not
    assert same_logits(leaked, dense, torch.bfloat16)
    assert not same_logits(dense + torch.tensor([[3.0, 0.0, 0.0]]), dense, torch.bfloat16)


@pytest.mark.parametrize("sliding_window", [None, 3])
def test_a_packed_row_attends_example_by_example_without_a_mask_over_the_row(
    monkeypatch, sliding_window
) -> None:
    fields = (
        "{model_type:qwen2,hidden_size:64,intermediate_size:128,num_hidden_layers:2,"
        "num_attention_heads:4,num_key_value_heads:2"
    )
    window = (
        f",use_sliding_window:true,sliding_window:{sliding_window},max_window_layers:0"
        if sliding_window
        else ""
    )
    _, model, _ = built_model(
        *TINY, "model=hf_causal_lm", "model.tokenizer=byte", f"model.architecture={fields}{window}}}"
    )
    assert attends_per_example(model)
    shapes = []
    real = packed_attention.sdpa_attention_forward

    def recorded(module, query, key, value, mask, **kwargs):
        shapes.append((query.shape[2], None if mask is None else tuple(mask.shape)))
        return real(module, query, key, value, mask, **kwargs)

    monkeypatch.setattr(packed_attention, "sdpa_attention_forward", recorded)
    row = one_row(EXAMPLES)  # two examples, 9 and 12 tokens
    with torch.no_grad():
        split = supervised_logits(model, row)[0]
    monkeypatch.undo()
    with torch.no_grad():
        dense = model(**model_inputs({k: v for k, v in row.items() if k != "labels"})).logits
    # every layer: one sdpa call per example over its own tokens; plainly causal blocks pass no mask at all
    expected = (
        [(9, None), (12, None)] if sliding_window is None else [(9, (1, 1, 9, 9)), (12, (1, 1, 12, 12))]
    )
    assert shapes == expected * 2
    torch.testing.assert_close(split, dense[:, kept_positions(row["labels"])], rtol=1e-5, atol=1e-5)


def test_flops_per_batch_equal_a_hand_count_on_a_tiny_model() -> None:
    _, model, _ = built_model(*TINY, "model=tiny_llama")  # hidden 64, MLP 128, 2 layers, 4 heads, 2 kv heads
    hidden, inner, layers, vocab = 64, 128, 2, model.config.vocab_size
    kv = 2 * hidden // 4
    weights = layers * (
        hidden * hidden * 2 + hidden * kv * 2 + 3 * hidden * inner
    )  # q, o; k, v; gate, up, down
    lengths, supervised = [9, 12], 7
    blocks = 2 * weights * 21  # 21 real tokens
    attention = 4 * (9 * 9 + 12 * 12) * hidden * layers  # each example's own square, 4 heads x 16 wide
    output = 2 * vocab * hidden * supervised  # the output layer at the supervised positions only
    counts = flop_counts(model)
    forward = blocks + attention + output
    assert batch_flops(counts, lengths, supervised, backward=False) == forward
    # full fine-tuning: backward = activation gradients + weight gradients = twice the forward
    assert batch_flops(counts, lengths, supervised, backward=True) == 3 * forward
    # a frozen base (LoRA without adapters): no weight gradients
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    try:
        frozen = batch_flops(flop_counts(model), lengths, supervised, backward=True)
    finally:
        for parameter in model.parameters():
            parameter.requires_grad_(True)
    assert frozen == 2 * blocks + 3 * attention + 2 * output


@pytest.mark.parametrize("extra_token", [False, True])
def test_classifier_flops_per_batch_equal_a_hand_count(extra_token: bool) -> None:
    _, model, _ = built_model(*TINY, "model=tiny_llama")
    for parameter in model.parameters():
        parameter.requires_grad_(False)  # the projection head's frozen backbone
    module = ClassifierModule(model, ["a", "b", "c"], hidden=32, extra_token=extra_token)
    module.setup("fit")
    hidden, inner, layers, vocab = 64, 128, 2, model.config.vocab_size
    weights = layers * (hidden * hidden * 2 + hidden * (hidden // 2) * 2 + 3 * hidden * inner)
    lengths = [9 + extra_token, 12 + extra_token]  # the texts (and the trainable token after each)
    blocks = 2 * weights * sum(lengths)
    attention = 4 * sum(n * n for n in lengths) * hidden * layers
    output = 2 * vocab * hidden * 2  # the backbone's output layer at one position per example
    head = 2 * (hidden * 32 + 32 * 3) * 2  # two linear maps, once per example
    batch = {"prompt_length": torch.tensor([9, 12]), "input_ids": torch.zeros(2, 14, dtype=torch.long)}
    module.counted = (batch, False)
    assert module.flops_per_batch == blocks + attention + output + head
    module.counted = (batch, True)
    # backward: the head's activation and weight gradients; through the frozen backbone only to reach the
    # trainable token (activation gradients, no weight gradients)
    through = blocks + 2 * attention if extra_token else 0
    assert module.flops_per_batch == blocks + attention + output + 3 * head + through


def test_measuring_the_peak_leaves_the_runs_random_stream_alone() -> None:
    state = torch.get_rng_state()
    assert measured_peak_flops(torch.device("cpu"), size=64, repeats=1) > 0
    assert torch.equal(torch.get_rng_state(), state)


def test_token_metrics_from_the_kept_logits_equal_those_of_the_selected_rows() -> None:
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 700, 50, generator=generator)  # [B, K, V]
    targets = torch.randint(0, 50, (3, 700), generator=generator)
    targets[0, :100] = IGNORE_INDEX
    supervised = targets != IGNORE_INDEX
    for sample in (False, True):
        metrics = CausalLMModule._token_metrics(logits, targets, supervised, sample)
        chosen, labels = logits[supervised], targets[supervised]  # [N, V], [N]: N = 2,000
        stride = 4 if sample else 1  # at most 512 of the 2,000 supervised positions
        top5 = (chosen[::stride].topk(5, -1).indices == labels[::stride, None]).any(-1).float().mean()
        confidence = chosen[::stride].softmax(-1).max(-1).values.mean()
        assert metrics["token_acc"] == (chosen.argmax(-1) == labels).float().mean()
        torch.testing.assert_close(metrics["top5_acc"], top5)
        torch.testing.assert_close(metrics["confidence"], confidence)


def test_answer_log_probs_on_kept_positions_equal_those_of_the_full_logits() -> None:
    _, model, _ = built_model(*TINY, "model=tiny_llama")
    batch = padded(EXAMPLES)
    with torch.no_grad():
        full = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
        targets = batch["labels"][:, 1:]
        nll = torch.nn.functional.cross_entropy(
            full.transpose(1, 2), targets, ignore_index=IGNORE_INDEX, reduction="none"
        )
        torch.testing.assert_close(answer_log_probs(model, batch), -nll.sum(-1), rtol=1e-6, atol=1e-5)
