"""Continuous batching for generation: rows of a batch that finish are replaced by waiting prompts at once,
every row decoding at its own position against one shared KV cache (and a shared prompt prefix prefilled
once). modeling/generation.py decides when a model can decode this way."""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence

import torch
from transformers import DynamicCache, PreTrainedModel, PreTrainedTokenizerBase

from modeling.architecture import forward_accepts
from modeling.decoding import Row, Sampler, Stopping, cache_keyword, pad_mask, positions

MIN_SHARED_PREFIX = 16  # tokens every prompt must share before that prefix is prefilled once


class ContinuousBatch:
    """Decodes requests `batch_size` at a time, dropping finished rows and prefilling waiting prompts. When
    every prompt starts with the same tokens (few-shot exemplars, an instruction), that prefix is prefilled
    once and its keys and values are copied into each new row's cache, so only the rest of each prompt is
    prefilled."""

    def __init__(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        batch_size: int,
        stopping: Stopping,
        sampler: Sampler,
        prefix_cache: bool = True,
    ) -> None:
        self.model, self.tokenizer, self.batch_size = model, tokenizer, batch_size
        self.stopping, self.sampler, self.prefix_cache = stopping, sampler, prefix_cache
        self.keep_last = {"logits_to_keep": 1} if forward_accepts(model, "logits_to_keep") else {}
        self.cache_key = cache_keyword(model)
        self.rows: list[Row] = []
        self.cache: DynamicCache | None = None
        self.mask = torch.zeros(0, 0, dtype=torch.long)  # [B, cache length + 1]: 0 over padding
        self.logits = torch.zeros(0, 0)  # [B, V] float32: the next-token logits of every row
        self.prefix: list[int] = []  # the token ids every prompt starts with, prefilled once into `prefix_kv`
        self.prefix_kv: DynamicCache | None = None

    def run(
        self, prompts: Sequence[str], requests: list[int], collect: Callable[[int, list[int]], None]
    ) -> None:
        """Decodes `requests` (prompt indices), handing each completion's token ids (up to and including the
        token that stopped it) to `collect` as its row finishes."""
        ids = [self.tokenizer(prompt)["input_ids"] for prompt in prompts]
        if self.prefix_cache:
            self._prefill_shared_prefix([ids[i] for i in dict.fromkeys(requests)])
        waiting = list(requests)
        while waiting or self.rows:
            free = self.batch_size - len(self.rows)
            if waiting and free:
                self._prefill([ids[i] for i in waiting[:free]], waiting[:free])
                waiting = waiting[free:]
            for row in self._step():
                collect(row.index, row.new)

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
            position_ids=positions(mask)[:, shared:],
            use_cache=True,
            **self.keep_last,
            **{self.cache_key: cache},
        )
        rows = [Row(i) for i in indices]
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
        self.mask = torch.cat([pad_mask(self.mask, width), pad_mask(mask, width)])
        self.rows += rows
        self.logits = torch.cat([self.logits, logits])

    def _step(self) -> list[Row]:
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
                position_ids=positions(self.mask)[:, -1:],
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
