"""Batched text generation for evaluation: left padding, KV cache, stop strings, greedy or sampled.

Prompt-learning peft models (prompt tuning) drop position ids, so under left padding a model with
absolute positions (GPT-2) would see shifted positions; for them a batch holds prompts of one token
length only (no padding), which keeps batched and one-by-one decoding identical.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

log = logging.getLogger(__name__)


def truncate_at_stop(text: str, stop_strings: Sequence[str]) -> str:
    """`text` up to (not including) the earliest stop string."""
    cut = min((i for i in (text.find(s) for s in stop_strings) if i >= 0), default=len(text))
    return text[:cut]


@torch.no_grad()
def generate(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    batch_size: int = 8,
    max_new_tokens: int = 256,
    stop_strings: Sequence[str] = (),
    do_sample: bool = False,
    temperature: float = 1.0,
    top_p: float = 1.0,
    num_samples: int = 1,
) -> list[list[str]]:
    """`num_samples` completions per prompt, in prompt order. Prompts are batched longest-first."""
    model.eval()
    tokenizer.padding_side = "left"
    completions: dict[int, list[str]] = {}
    sampling = {"do_sample": True, "temperature": temperature, "top_p": top_p} if do_sample else {"do_sample": False}
    for indices in _batches(model, tokenizer, prompts, batch_size):
        encoded = tokenizer([prompts[i] for i in indices], return_tensors="pt", padding=True).to(model.device)
        output = model.generate(
            **encoded,
            max_new_tokens=max_new_tokens,
            num_return_sequences=num_samples,
            stop_strings=list(stop_strings) or None,
            tokenizer=tokenizer,
            pad_token_id=tokenizer.pad_token_id,
            **sampling,
        )  # [B * num_samples, prompt + new]
        texts = tokenizer.batch_decode(output[:, encoded["input_ids"].shape[1] :], skip_special_tokens=True)
        for row, index in enumerate(indices):
            samples = texts[row * num_samples : (row + 1) * num_samples]
            completions[index] = [truncate_at_stop(t, stop_strings) for t in samples]
        log.info("generated %d / %d prompts", len(completions), len(prompts))
    return [completions[i] for i in range(len(prompts))]


def _batches(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, prompts: Sequence[str], size: int) -> list[list[int]]:
    """Prompt indices in batches of at most `size`, longest first; one token length per batch for prompt learning."""
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    if not getattr(getattr(model, "active_peft_config", None), "is_prompt_learning", False):
        return [order[first : first + size] for first in range(0, len(order), size)]
    groups: dict[int, list[int]] = {}
    for index in order:
        groups.setdefault(len(tokenizer(prompts[index])["input_ids"]), []).append(index)
    return [group[first : first + size] for group in groups.values() for first in range(0, len(group), size)]
