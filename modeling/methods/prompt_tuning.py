"""Prompt tuning (Lester et al. 2021): `num_virtual_tokens` trainable embeddings before the input.

Through peft where the model's forward takes `inputs_embeds` (peft hands the virtual tokens in that way).
Where it does not (remote code such as MiniMind), the same computation is done at the embedding layer:
placeholder ids are prepended to the input (and ones to the mask, -100 to the labels, shifted position ids),
and a hook replaces their embeddings by the trainable vectors (modeling/injection.py). Both give the
same loss on a model that has `inputs_embeds` (tests/test_remote_code.py). Decoding steps that continue from a
cache skip the placeholders: the virtual tokens are already in the cache.

`init: random` draws the virtual tokens at random (N(0, 1), as peft does); `init: text` copies the word
embeddings of `init_text` (repeated or cut to the number of virtual tokens). The text init is done here with
the run's own tokenizer, because peft's would call `AutoTokenizer.from_pretrained(<hub id>)`, which needs the
hub (and cannot load the byte-level or GGUF tokenizers).
"""

from __future__ import annotations

from functools import partial
from typing import Any

import torch
from peft import PromptTuningConfig, PromptTuningInit, get_peft_model
from torch import nn
from transformers import PreTrainedModel

from modeling import architecture
from modeling.injection import EmbeddingSlots
from modeling.methods import MethodContext

PROMPT_MODULE = "prompt_embedding"  # where the vectors live on a model without inputs_embeds


class EmbeddingPrompt(nn.Module):
    """The trainable virtual-token vectors of prompt tuning at the embedding layer: weight [V, H]."""

    def __init__(self, num_virtual_tokens: int, width: int) -> None:
        super().__init__()
        self.embedding = nn.Embedding(num_virtual_tokens, width)


def embedding_prompt(model: nn.Module) -> EmbeddingPrompt | None:
    """The EmbeddingPrompt attached to `model`, if prompt tuning runs at its embedding layer."""
    found = getattr(architecture.bare_model(model), PROMPT_MODULE, None)
    return found if isinstance(found, EmbeddingPrompt) else None


def attach_embedding_prompt(model: PreTrainedModel, num_virtual_tokens: int) -> PreTrainedModel:
    """Freeze `model` and prepend `num_virtual_tokens` trainable vectors to every input at its embedding
    layer."""
    width = architecture.input_embeddings(model).embedding_dim
    prompt = EmbeddingPrompt(num_virtual_tokens, width).to(next(model.parameters()).device)
    model.requires_grad_(False)
    model.add_module(PROMPT_MODULE, prompt)
    model.register_forward_pre_hook(partial(_prepend, prompt, EmbeddingSlots(model)), with_kwargs=True)
    return model


def _prepend(
    prompt: EmbeddingPrompt, slots: EmbeddingSlots, module: nn.Module, args: tuple, kwargs: dict[str, Any]
) -> tuple[tuple, dict[str, Any]]:
    if args:  # the token ids given by position
        kwargs, args = {"input_ids": args[0], **kwargs}, args[1:]
    if _holds_tokens(kwargs.get("past_key_values", kwargs.get("cache"))):
        return args, kwargs
    ids = kwargs["input_ids"]  # [B, T]
    count, rows = prompt.embedding.num_embeddings, len(ids)
    kwargs["input_ids"] = torch.cat(
        [ids[:, :1].expand(rows, count), ids], 1
    )  # placeholder ids, replaced below
    extensions = {"attention_mask": 1, "labels": -100}
    for name, value in extensions.items():
        if kwargs.get(name) is not None:
            kwargs[name] = torch.cat([kwargs[name].new_full((rows, count), value), kwargs[name]], 1)
    if kwargs.get("position_ids") is not None:
        first = torch.arange(count, device=ids.device).expand(rows, count)
        kwargs["position_ids"] = torch.cat([first, kwargs["position_ids"] + count], 1)
    positions = torch.arange(count, device=ids.device)
    slots.place(
        torch.arange(rows, device=ids.device).repeat_interleave(count),
        positions.repeat(rows),
        prompt.embedding.weight.repeat(rows, 1),
    )
    return args, kwargs


def _holds_tokens(cache: Any) -> bool:
    """Whether a cache passed to a forward already holds positions (then the input continues a decoded
    sequence)."""
    if cache is None:
        return False
    if hasattr(cache, "get_seq_length"):
        return cache.get_seq_length() > 0
    return len(cache) > 0 and cache[0] is not None


def apply(
    model: PreTrainedModel,
    context: MethodContext,
    num_virtual_tokens: int = 20,
    init: str = "random",
    init_text: str = "",
) -> PreTrainedModel:
    """Freeze the model and prepend `num_virtual_tokens` trainable prompt embeddings (random, or
    `init_text`'s)."""
    if init not in ("random", "text"):
        raise ValueError(f"method.init must be 'random' or 'text', got {init!r}")
    embeddings = architecture.input_embeddings(model)
    if architecture.forward_accepts(model, "inputs_embeds"):
        config = PromptTuningConfig(
            task_type="CAUSAL_LM",
            num_virtual_tokens=num_virtual_tokens,
            prompt_tuning_init=PromptTuningInit.RANDOM,
        )
        tuned = get_peft_model(model, config)
        vectors = tuned.prompt_encoder["default"].embedding.weight
    else:
        tuned = attach_embedding_prompt(model, num_virtual_tokens)
        vectors = embedding_prompt(tuned).embedding.weight
    if init == "text" and context.tokenizer is not None:
        ids = context.tokenizer(init_text, add_special_tokens=False)["input_ids"]
        if not ids:
            raise ValueError(
                "method.init_text tokenizes to nothing; give a non-empty text or use method.init=random"
            )
        ids = (ids * -(-num_virtual_tokens // len(ids)))[:num_virtual_tokens]
        with torch.no_grad():
            vectors.copy_(embeddings(torch.tensor(ids, device=embeddings.weight.device)))  # [V, H]
    return tuned
