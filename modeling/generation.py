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

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from transformers import DynamicCache, PreTrainedModel, PreTrainedTokenizerBase

from modeling.architecture import forward_accepts
from modeling.continuous_batching import ContinuousBatch
from modeling.decoding import Row, Sampler, Stopping, cache_keyword, returned_cache
from modeling.injection import embedding_prompt
from modeling.progress import Progress

# called with a prompt's index and its completions (cut at the stop strings) as soon as all are done
Finished = Callable[[int, list[str]], None]
# called by a decoder with a prompt's index and one completion's token ids (up to and including the token that
# stopped it), as soon as it is done
Collect = Callable[[int, list[int]], None]


@dataclass(frozen=True)
class Decoding:
    """How completions are decoded: prompts per batch, new tokens at most, stop strings, greedy or sampled
    (temperature, top-p), completions per prompt, and whether the prefix all prompts share is prefilled
    once."""

    batch_size: int
    max_new_tokens: int
    stop_strings: tuple[str, ...] = ()
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    num_samples: int = 1
    prefix_cache: bool = True


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
    on_finished: Finished | None = None,
) -> list[list[str]]:
    """`num_samples` completions per prompt, in prompt order, each cut at its first stop string
    (`prefix_cache`: the prefix all prompts share is prefilled once); `on_finished` hears of each prompt
    whose completions are all done, as it happens. Progress is shown as completions finish."""
    texts: dict[int, list[str]] = {i: [] for i in range(len(prompts))}
    progress = Progress(len(prompts) * num_samples, "completions generated")

    def collect(index: int, ids: list[int]) -> None:
        texts[index].append(truncate_at_stop(tokenizer.decode(ids, skip_special_tokens=True), stop_strings))
        progress.advance()
        if on_finished is not None and len(texts[index]) == num_samples:
            on_finished(index, texts[index])

    settings = Decoding(
        batch_size,
        max_new_tokens,
        tuple(stop_strings),
        do_sample,
        temperature,
        top_p,
        num_samples,
        prefix_cache,
    )
    with progress:
        decode(model, tokenizer, prompts, collect, settings)
    return [texts[i] for i in range(len(prompts))]


@torch.no_grad()
def sample_token_ids(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    num_samples: int,
    batch_size: int = 8,
    max_new_tokens: int = 256,
    stop_strings: Sequence[str] = (),
    temperature: float = 1.0,
    top_p: float = 1.0,
) -> list[list[list[int]]]:
    """`num_samples` sampled completions per prompt as token ids, in prompt order (each up to and including
    the EOS token or the token that completed a stop string): what a policy-gradient step scores and trains
    on. The draws come from torch's global RNG on the model's device."""
    ids: dict[int, list[list[int]]] = {i: [] for i in range(len(prompts))}
    settings = Decoding(
        batch_size, max_new_tokens, tuple(stop_strings), True, temperature, top_p, num_samples
    )
    decode(model, tokenizer, prompts, lambda index, new: ids[index].append(new), settings)
    return [ids[i] for i in range(len(prompts))]


def decode(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    collect: Collect,
    settings: Decoding,
) -> None:
    """Decode `num_samples` completions of every prompt with the decoder the model allows, handing each
    one's token ids to `collect` as it finishes (the model is left in eval mode)."""
    model.eval()
    tokenizer.padding_side = "left"
    if getattr(getattr(model, "active_peft_config", None), "is_prompt_learning", False):
        _generate_prompt_learning(model, tokenizer, prompts, collect, settings)
        return
    sampler = Sampler(settings.do_sample, settings.temperature, settings.top_p)
    stopping = Stopping(model, tokenizer, settings.max_new_tokens, settings.stop_strings)
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    requests = [i for i in order for _ in range(settings.num_samples)]
    if batches_continuously(model):
        decoder = ContinuousBatch(
            model, tokenizer, settings.batch_size, stopping, sampler, settings.prefix_cache
        )
    else:
        decoder = _SameLengthBatches(model, tokenizer, settings.batch_size, stopping, sampler)
    decoder.run(prompts, requests, collect)


def batches_continuously(model: PreTrainedModel) -> bool:
    """Whether `model` can decode in a continuous batch: it names position ids in its forward, extends no
    inputs itself, and keeps its keys and values in a transformers Cache (a two-token forward fills a
    DynamicCache; a hybrid's state-space or convolution layers need a cache of their own and refuse it)."""
    if not forward_accepts(model, "position_ids") or embedding_prompt(model) is not None:
        return False
    cache = DynamicCache()
    try:
        model(
            input_ids=torch.zeros(1, 2, dtype=torch.long, device=model.device),
            use_cache=True,
            **{cache_keyword(model): cache},
        )
    except (IndexError, TypeError, ValueError, AttributeError):  # a hybrid wants its own cache class
        return False
    return cache.get_seq_length() == 2


class _SameLengthBatches:
    """Decodes prompts of one token length together, `batch_size` at a time, with no padding, mask or position
    ids, passing back the cache the model returns in whatever format (a model that returns none gets the whole
    sequence at every step). Finished rows keep their place until the whole batch is done."""

    def __init__(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        batch_size: int,
        stopping: Stopping,
        sampler: Sampler,
    ) -> None:
        self.model, self.tokenizer, self.batch_size = model, tokenizer, batch_size
        self.stopping, self.sampler = stopping, sampler
        self.cache_key = cache_keyword(model)
        self.caches = forward_accepts(model, self.cache_key) and forward_accepts(model, "use_cache")

    def run(self, prompts: Sequence[str], requests: list[int], collect: Collect) -> None:
        """Decodes `requests` (prompt indices), handing each completion's token ids to `collect`."""
        groups: dict[int, list[int]] = {}
        for index in requests:
            groups.setdefault(len(self.tokenizer(prompts[index])["input_ids"]), []).append(index)
        for group in groups.values():
            for first in range(0, len(group), self.batch_size):
                for row in self._decode(prompts, group[first : first + self.batch_size]):
                    collect(row.index, row.new)

    def _decode(self, prompts: Sequence[str], indices: list[int]) -> list[Row]:
        encoded = self.tokenizer([prompts[i] for i in indices], return_tensors="pt")
        sequence = encoded["input_ids"].to(self.model.device)  # [k, P], all of one length
        rows, running = [Row(i) for i in indices], set(range(len(indices)))
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
            cache = returned_cache(output) if self.caches else None
            step = sequence[:, -1:] if cache is not None else sequence
        return rows


def _generate_prompt_learning(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    collect: Collect,
    settings: Decoding,
) -> None:
    """Completions through `model.generate`, in batches of prompts of one token length, each handed to
    `collect`."""
    groups: dict[int, list[int]] = {}
    for index in sorted(range(len(prompts)), key=lambda i: -len(prompts[i])):
        groups.setdefault(len(tokenizer(prompts[index])["input_ids"]), []).append(index)
    sampling = {"do_sample": settings.do_sample}
    if settings.do_sample:
        sampling |= {"temperature": settings.temperature, "top_p": settings.top_p}
    batch_size, num_samples = settings.batch_size, settings.num_samples
    for group in groups.values():
        for first in range(0, len(group), batch_size):
            indices = group[first : first + batch_size]
            encoded = tokenizer([prompts[i] for i in indices], return_tensors="pt", padding=True).to(
                model.device
            )
            # [B * num_samples, prompt + new]
            output = model.generate(
                **encoded,
                max_new_tokens=settings.max_new_tokens,
                num_return_sequences=num_samples,
                stop_strings=list(settings.stop_strings) or None,
                tokenizer=tokenizer,
                pad_token_id=tokenizer.pad_token_id,
                **sampling,
            )
            new = output[:, encoded["input_ids"].shape[1] :].tolist()  # [B * num_samples, new]
            ends = {tokenizer.pad_token_id, *Stopping(model, tokenizer, settings.max_new_tokens, ()).eos}
            for row, index in enumerate(indices):
                for ids in new[row * num_samples : (row + 1) * num_samples]:
                    end = next((i for i, token in enumerate(ids) if token in ends), len(ids) - 1)
                    collect(index, ids[: end + 1])
