"""Batched text generation for evaluation: continuous batching over a shared KV cache, stop strings, greedy
or sampled.

A batch holds at most `batch_size` rows. A row leaves the batch (and the KV cache) as soon as it hits an EOS
token, a stop string or `max_new_tokens`, and the longest waiting prompts take its place, so a batch no longer
costs its slowest row. Rows are left-padded to a common cache length; padding is masked, so a row's greedy
output is the one `model.generate` gives that prompt alone (tests/test_evaluate.py checks both). When all
prompts start with the same tokens (k-shot exemplars drawn once for all problems, a fixed instruction), those
are prefilled once and their keys and values copied into every row, after which the row's own tokens are
prefilled (with any padding between the two masked); the outputs are those of prefilling every prompt in full.

Continuous batching needs a model that honours position ids and keeps its keys and values in a transformers
`Cache` (checked on the model: a two-token forward must fill a DynamicCache). Any other model (remote code
with its own cache format, or one that ignores position ids, such as MiniMind; prompt tuning at the embedding
layer) decodes prompts of one token length together, without padding, masks or position ids, passing back
whatever cache the model returns (or none): its greedy outputs are those of a plain forward-only greedy
decode.

Prompt-learning peft models (prompt tuning) prepend virtual tokens inside `generate`, so they decode
through `model.generate` instead, in batches of one prompt token length (no padding: such models drop
position ids, and a model with absolute positions, GPT-2, would see shifted ones under left padding).
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import DynamicCache, PreTrainedModel, PreTrainedTokenizerBase
from transformers.generation import LogitsProcessorList, TemperatureLogitsWarper, TopPLogitsWarper

from modeling.architecture import forward_accepts
from modeling.injection import embedding_prompt

log = logging.getLogger(__name__)

MIN_SHARED_PREFIX = 16  # tokens every prompt must share before that prefix is prefilled once


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
    prefix_cache: bool = True,
) -> list[list[str]]:
    """`num_samples` completions per prompt, in prompt order, each cut at its first stop string
    (`prefix_cache`: the prefix all prompts share is prefilled once)."""
    model.eval()
    tokenizer.padding_side = "left"
    if getattr(getattr(model, "active_peft_config", None), "is_prompt_learning", False):
        texts = _generate_prompt_learning(
            model,
            tokenizer,
            prompts,
            batch_size,
            max_new_tokens,
            stop_strings,
            do_sample,
            temperature,
            top_p,
            num_samples,
        )
    else:
        sampler = _Sampler(do_sample, temperature, top_p)
        stopping = _Stopping(model, tokenizer, max_new_tokens, stop_strings)
        requests = [
            i for i in sorted(range(len(prompts)), key=lambda i: -len(prompts[i])) for _ in range(num_samples)
        ]
        if batches_continuously(model):
            decoder = _ContinuousBatch(model, tokenizer, batch_size, stopping, sampler, prefix_cache)
        else:
            decoder = _SameLengthBatches(model, tokenizer, batch_size, stopping, sampler)
        texts = decoder.run(prompts, requests)
    return [[truncate_at_stop(t, stop_strings) for t in texts[i]] for i in range(len(prompts))]


def batches_continuously(model: PreTrainedModel) -> bool:
    """Whether `model` can decode in a continuous batch: it names position ids in its forward, extends no
    inputs itself, and keeps its keys and values in a transformers Cache (a two-token forward fills a
    DynamicCache)."""
    if not forward_accepts(model, "position_ids") or embedding_prompt(model) is not None:
        return False
    cache = DynamicCache()
    model(
        input_ids=torch.zeros(1, 2, dtype=torch.long, device=model.device),
        use_cache=True,
        **{cache_keyword(model): cache},
    )
    return cache.get_seq_length() == 2


def cache_keyword(model: PreTrainedModel) -> str:
    """The keyword the model's forward takes its KV cache under: `cache` (transformers >= 5.24) where it names
    it, else `past_key_values`. Looked up once per decoder, not per step: it reads the forward's signature."""
    return "cache" if forward_accepts(model, "cache") else "past_key_values"


class _Sampler:
    """Next-token choice: argmax (as `generate` does greedily), or a draw after temperature and top-p."""

    def __init__(self, do_sample: bool, temperature: float, top_p: float) -> None:
        self.do_sample = do_sample
        self.warpers = LogitsProcessorList([TemperatureLogitsWarper(temperature), TopPLogitsWarper(top_p)])

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        """logits [B, V] float32 -> next token ids [B]."""
        if not self.do_sample:
            return logits.argmax(-1)
        return torch.multinomial(self.warpers(None, logits).softmax(-1), 1).squeeze(-1)


@dataclass
class _Row:
    """One request in the running batch: its prompt index and the tokens generated so far."""

    index: int
    new: list[int] = field(default_factory=list)


class _Stopping:
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

    def __call__(self, row: _Row) -> bool:
        if row.new[-1] in self.eos or len(row.new) >= self.max_new_tokens:
            return True
        text = self.tokenizer.decode(row.new, skip_special_tokens=False)
        return any(stop in text for stop in self.stop_strings)


class _ContinuousBatch:
    """Decodes requests `batch_size` at a time, dropping finished rows and prefilling waiting prompts. When
    every prompt starts with the same tokens (few-shot exemplars, an instruction), that prefix is prefilled
    once and its keys and values are copied into each new row's cache, so only the rest of each prompt is
    prefilled."""

    def __init__(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        batch_size: int,
        stopping: _Stopping,
        sampler: _Sampler,
        prefix_cache: bool = True,
    ) -> None:
        self.model, self.tokenizer, self.batch_size = model, tokenizer, batch_size
        self.stopping, self.sampler, self.prefix_cache = stopping, sampler, prefix_cache
        self.keep_last = {"logits_to_keep": 1} if forward_accepts(model, "logits_to_keep") else {}
        self.cache_key = cache_keyword(model)
        self.rows: list[_Row] = []
        self.cache: DynamicCache | None = None
        self.mask = torch.zeros(0, 0, dtype=torch.long)  # [B, cache length + 1]: 0 over padding
        self.logits = torch.zeros(0, 0)  # [B, V] float32: the next-token logits of every row
        self.prefix: list[int] = []  # the token ids every prompt starts with, prefilled once into `prefix_kv`
        self.prefix_kv: DynamicCache | None = None

    def run(self, prompts: Sequence[str], requests: list[int]) -> dict[int, list[str]]:
        """Completions (full decoded text, before stop-string truncation) of `requests`, by prompt index."""
        ids = [self.tokenizer(prompt)["input_ids"] for prompt in prompts]
        if self.prefix_cache:
            self._prefill_shared_prefix([ids[i] for i in dict.fromkeys(requests)])
        waiting, done = list(requests), {i: [] for i in requests}
        while waiting or self.rows:
            free = self.batch_size - len(self.rows)
            if waiting and free:
                self._prefill([ids[i] for i in waiting[:free]], waiting[:free])
                waiting = waiting[free:]
            finished = self._step()
            for row in finished:
                done[row.index].append(self.tokenizer.decode(row.new, skip_special_tokens=True))
            if finished:
                log.info("generated %d / %d completions", sum(map(len, done.values())), len(requests))
        return done

    def _prefill_shared_prefix(self, prompts: list[list[int]]) -> None:
        """Prefill the tokens all `prompts` start with (when they are at least MIN_SHARED_PREFIX and every
        prompt has more), once, for one row."""
        shared = len(prompts[0])
        for ids in prompts[1:]:
            shared = next(
                (i for i, (a, b) in enumerate(zip(ids[:shared], prompts[0], strict=False)) if a != b),
                min(shared, len(ids)),
            )
        shared = min(shared, min(map(len, prompts)) - 1)  # every row keeps a token of its own to prefill
        if len(prompts) < 2 or shared < MIN_SHARED_PREFIX:
            return
        self.prefix, self.prefix_kv = prompts[0][:shared], DynamicCache()
        self.model(
            input_ids=torch.tensor([self.prefix], device=self.model.device),
            use_cache=True,
            **self.keep_last,
            **{self.cache_key: self.prefix_kv},
        )

    def _prefill(self, prompts: list[list[int]], indices: list[int]) -> None:
        """Run `prompts` (left-padded among themselves, after the shared prefix's cache where there is one)
        and join their cache to the batch's."""
        shared = len(self.prefix)
        rest = [ids[shared:] for ids in prompts]
        width = max(map(len, rest))
        input_ids = torch.tensor(
            [[self.tokenizer.pad_token_id] * (width - len(r)) + r for r in rest], device=self.model.device
        )
        mask = torch.tensor(
            [[1] * shared + [0] * (width - len(r)) + [1] * len(r) for r in rest], device=self.model.device
        )
        cache = DynamicCache()  # [k, P + S]: prefix, then each row's left-padded rest
        if self.prefix_kv is not None:
            cache = copy.deepcopy(self.prefix_kv)
            cache.batch_repeat_interleave(len(rest))
        output = self.model(
            input_ids=input_ids,
            attention_mask=mask,
            position_ids=_positions(mask)[:, shared:],
            use_cache=True,
            **self.keep_last,
            **{self.cache_key: cache},
        )
        rows = [_Row(i) for i in indices]
        logits = output.logits[:, -1, :].float()
        if self.cache is None:
            self.rows, self.cache, self.mask, self.logits = rows, cache, mask, logits
            return
        width = max(self.mask.shape[1], mask.shape[1])
        self._pad_left(self.cache, width - self.mask.shape[1])
        self._pad_left(cache, width - mask.shape[1])
        for ours, theirs in zip(self.cache.layers, cache.layers, strict=True):
            ours.keys = torch.cat([ours.keys, theirs.keys])
            ours.values = torch.cat([ours.values, theirs.values])
        self.mask = torch.cat([_pad_mask(self.mask, width), _pad_mask(mask, width)])
        self.rows += rows
        self.logits = torch.cat([self.logits, logits])

    def _step(self) -> list[_Row]:
        """Choose every row's next token, retire the rows that finish, and run the rest one position
        further."""
        chosen = self.sampler(self.logits).tolist()
        finished, keep = [], []
        for position, (row, token) in enumerate(zip(self.rows, chosen, strict=True)):
            row.new.append(token)
            if self.stopping(row):
                finished.append(row)
            else:
                keep.append(position)
        if len(keep) < len(self.rows):
            self._select(keep)
        if self.rows:
            self.mask = torch.cat([self.mask, self.mask.new_ones(len(self.rows), 1)], dim=1)
            step = torch.tensor([[r.new[-1]] for r in self.rows], device=self.model.device)
            output = self.model(
                input_ids=step,
                attention_mask=self.mask,
                position_ids=_positions(self.mask)[:, -1:],
                use_cache=True,
                **{self.cache_key: self.cache},
            )
            self.logits = output.logits[:, -1, :].float()
        return finished

    def _select(self, keep: list[int]) -> None:
        """Keep only the rows at `keep` and drop the left-padding columns no remaining row needs."""
        self.rows = [self.rows[i] for i in keep]
        if not keep:
            self.cache = None
            return
        index = torch.tensor(keep, device=self.mask.device)
        self.mask, self.logits = self.mask[index], self.logits[index]
        first = int(self.mask.any(0).long().argmax())  # first column some row attends to
        self.mask = self.mask[:, first:]
        for layer in self.cache.layers:
            layer.keys = layer.keys[index, :, first:]  # [B, heads, length, head dim]
            layer.values = layer.values[index, :, first:]

    @staticmethod
    def _pad_left(cache: DynamicCache, width: int) -> None:
        if width:
            for layer in cache.layers:
                layer.keys = torch.nn.functional.pad(layer.keys, (0, 0, width, 0))
                layer.values = torch.nn.functional.pad(layer.values, (0, 0, width, 0))


class _SameLengthBatches:
    """Decodes prompts of one token length together, `batch_size` at a time, with no padding, mask or position
    ids, passing back the cache the model returns in whatever format (a model that returns none gets the whole
    sequence at every step). Finished rows keep their place until the whole batch is done."""

    def __init__(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        batch_size: int,
        stopping: _Stopping,
        sampler: _Sampler,
    ) -> None:
        self.model, self.tokenizer, self.batch_size = model, tokenizer, batch_size
        self.stopping, self.sampler = stopping, sampler
        self.cache_key = cache_keyword(model)
        self.caches = forward_accepts(model, self.cache_key) and forward_accepts(model, "use_cache")

    def run(self, prompts: Sequence[str], requests: list[int]) -> dict[int, list[str]]:
        """Completions (full decoded text, before stop-string truncation) of `requests`, by prompt index."""
        groups: dict[int, list[int]] = {}
        for index in requests:
            groups.setdefault(len(self.tokenizer(prompts[index])["input_ids"]), []).append(index)
        done: dict[int, list[str]] = {i: [] for i in requests}
        for group in groups.values():
            for first in range(0, len(group), self.batch_size):
                for row in self._decode(prompts, group[first : first + self.batch_size]):
                    done[row.index].append(self.tokenizer.decode(row.new, skip_special_tokens=True))
            log.info("generated %d / %d completions", sum(map(len, done.values())), len(requests))
        return done

    def _decode(self, prompts: Sequence[str], indices: list[int]) -> list[_Row]:
        encoded = self.tokenizer([prompts[i] for i in indices], return_tensors="pt")
        sequence = encoded["input_ids"].to(self.model.device)  # [k, P], all of one length
        rows, running = [_Row(i) for i in indices], set(range(len(indices)))
        step, cache = sequence, None
        while running:
            extra = {"use_cache": True, self.cache_key: cache} if self.caches else {}
            output = self.model(input_ids=step, **extra)
            chosen = self.sampler(output.logits[:, -1, :].float())  # [k]
            for position in sorted(running):
                rows[position].new.append(int(chosen[position]))
                if self.stopping(rows[position]):
                    running.discard(position)
            sequence = torch.cat([sequence, chosen[:, None]], dim=1)
            cache = _returned_cache(output) if self.caches else None
            step = sequence[:, -1:] if cache is not None else sequence
        return rows


def _returned_cache(output: Any) -> Any:
    """The cache a forward returned (`cache` in transformers >= 5.24 outputs, `past_key_values` before), or
    None."""
    cache = output.get("cache")
    return output.get("past_key_values") if cache is None else cache


def _positions(mask: torch.Tensor) -> torch.Tensor:
    """Position ids of left-padded rows, as `generate` computes them: 0 at each row's first real token."""
    return (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 1)


def _pad_mask(mask: torch.Tensor, width: int) -> torch.Tensor:
    return torch.nn.functional.pad(mask, (width - mask.shape[1], 0))


def _generate_prompt_learning(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    batch_size: int,
    max_new_tokens: int,
    stop_strings: Sequence[str],
    do_sample: bool,
    temperature: float,
    top_p: float,
    num_samples: int,
) -> dict[int, list[str]]:
    """Completions through `model.generate`, in batches of prompts of one token length."""
    groups: dict[int, list[int]] = {}
    for index in sorted(range(len(prompts)), key=lambda i: -len(prompts[i])):
        groups.setdefault(len(tokenizer(prompts[index])["input_ids"]), []).append(index)
    sampling = (
        {"do_sample": True, "temperature": temperature, "top_p": top_p} if do_sample else {"do_sample": False}
    )
    completions: dict[int, list[str]] = {}
    for group in groups.values():
        for first in range(0, len(group), batch_size):
            indices = group[first : first + batch_size]
            encoded = tokenizer([prompts[i] for i in indices], return_tensors="pt", padding=True).to(
                model.device
            )
            # [B * num_samples, prompt + new]
            output = model.generate(
                **encoded,
                max_new_tokens=max_new_tokens,
                num_return_sequences=num_samples,
                stop_strings=list(stop_strings) or None,
                tokenizer=tokenizer,
                pad_token_id=tokenizer.pad_token_id,
                **sampling,
            )
            texts = tokenizer.batch_decode(
                output[:, encoded["input_ids"].shape[1] :], skip_special_tokens=True
            )
            for row, index in enumerate(indices):
                completions[index] = texts[row * num_samples : (row + 1) * num_samples]
    return completions
