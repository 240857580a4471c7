"""The pieces every decoding loop of modeling/generation.py shares: sampling (greedy or temperature/top-p),
per-row stopping, and the cache and position bookkeeping of a batch."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase
from transformers.generation import LogitsProcessorList, TemperatureLogitsWarper, TopPLogitsWarper

from modeling.architecture import forward_accepts


def cache_keyword(model: PreTrainedModel) -> str:
    """The keyword the model's forward takes its KV cache under: `cache` (transformers >= 5.24) where it names
    it, else `past_key_values`. Looked up once per decoder, not per step: it reads the forward's signature."""
    return "cache" if forward_accepts(model, "cache") else "past_key_values"


class Sampler:
    """Next-token choice: argmax (as `generate` does greedily), or a draw after temperature and top-p (each
    applied only where it changes the distribution, as `generate` does: top-p sorts the vocabulary)."""

    def __init__(self, do_sample: bool, temperature: float, top_p: float) -> None:
        self.do_sample = do_sample
        warpers = [TemperatureLogitsWarper(temperature)] if temperature != 1.0 else []
        self.warpers = LogitsProcessorList([*warpers, *([TopPLogitsWarper(top_p)] if top_p < 1.0 else [])])

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        """logits [B, V] float32 -> next token ids [B]. One draw per row from the inverse of its cumulative
        distribution (`replacement=True`: the same distribution for one draw, without the exponential variate
        per vocabulary entry that a draw without replacement makes)."""
        if not self.do_sample:
            return logits.argmax(-1)
        return torch.multinomial(self.warpers(None, logits).softmax(-1), 1, replacement=True).squeeze(-1)


@dataclass
class Row:
    """One request in the running batch: its prompt index and the tokens generated so far."""

    index: int
    new: list[int] = field(default_factory=list)


class Stopping:
    """When a row is done: an EOS token, `max_new_tokens` tokens, or a stop string in its decoded text."""

    def __init__(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        max_new_tokens: int,
        stop_strings: Sequence[str],
    ) -> None:
        eos = model.generation_config.eos_token_id
        self.eos = set(eos if isinstance(eos, list) else [] if eos is None else [eos])
        self.tokenizer, self.max_new_tokens, self.stop_strings = tokenizer, max_new_tokens, list(stop_strings)

    def __call__(self, row: Row) -> bool:
        if row.new[-1] in self.eos or len(row.new) >= self.max_new_tokens:
            return True
        if not self.stop_strings:
            return False
        text = self.tokenizer.decode(row.new, skip_special_tokens=False)
        return any(stop in text for stop in self.stop_strings)


def returned_cache(output: Any) -> Any:
    """The cache a forward returned (`cache` in transformers >= 5.24 outputs, `past_key_values` before), or
    None."""
    cache = output.get("cache")
    return output.get("past_key_values") if cache is None else cache


def positions(mask: torch.Tensor) -> torch.Tensor:
    """Position ids of left-padded rows, as `generate` computes them: 0 at each row's first real token."""
    return (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 1)


def pad_mask(mask: torch.Tensor, width: int) -> torch.Tensor:
    return torch.nn.functional.pad(mask, (width - mask.shape[1], 0))
