"""Prompt tuning (Lester et al. 2021): `num_virtual_tokens` trainable embeddings before the input.

Through peft where the model's forward takes `inputs_embeds` (peft hands the virtual tokens in that way).
Where it does not (remote code such as MiniMind), the same computation is done at the embedding layer:
placeholder ids are prepended to the input (ones to the mask, IGNORE_INDEX to the labels, shifted position
ids), and a hook replaces their embeddings by the trainable vectors (modeling/injection.py). Both give the
same loss on a model that has `inputs_embeds` (tests/test_remote_code.py). Decoding steps that continue from a
cache skip the placeholders: the virtual tokens are already in the cache.

`init: random` draws the virtual tokens at random (N(0, 1), as peft does); `init: text` copies the word
embeddings of `init_text` (repeated or cut to the number of virtual tokens). The text init is done here with
the run's own tokenizer, because peft's would call `AutoTokenizer.from_pretrained(<hub id>)`, which needs the
hub (and cannot load the byte-level or GGUF tokenizers)."""

from __future__ import annotations

import torch
from peft import PromptTuningConfig, PromptTuningInit, get_peft_model
from transformers import PreTrainedModel

from lightning_modules.methods import MethodContext
from modeling import architecture
from modeling.injection import attach_embedding_prompt, embedding_prompt

SUPPORTS = ("causal_lm", "label_lm")  # the task modules it can train


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
