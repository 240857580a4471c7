"""Prompt tuning (Lester et al. 2021) through peft: `num_virtual_tokens` trainable embeddings before the input.

`init: random` draws the virtual tokens at random; `init: text` copies the word embeddings of
`init_text` (repeated or cut to the number of virtual tokens). The text init is done here with the
run's own tokenizer, because peft's would call `AutoTokenizer.from_pretrained(<hub id>)`, which needs
the hub (and cannot load the byte-level or GGUF tokenizers).
"""

from __future__ import annotations

import torch
from peft import PeftModel, PromptTuningConfig, PromptTuningInit, get_peft_model
from transformers import PreTrainedModel

from lightning_modules.methods import MethodContext


def apply(model: PreTrainedModel, context: MethodContext, num_virtual_tokens: int = 20, init: str = "random",
          init_text: str = "") -> PeftModel:
    """Freeze the model and prepend `num_virtual_tokens` trainable prompt embeddings (random, or `init_text`'s)."""
    if init not in ("random", "text"):
        raise ValueError(f"method.init must be 'random' or 'text', got {init!r}")
    config = PromptTuningConfig(
        task_type="CAUSAL_LM", num_virtual_tokens=num_virtual_tokens, prompt_tuning_init=PromptTuningInit.RANDOM
    )
    peft_model = get_peft_model(model, config)
    if init == "text" and context.tokenizer is not None:
        ids = context.tokenizer(init_text, add_special_tokens=False)["input_ids"]
        if not ids:
            raise ValueError("method.init_text tokenizes to nothing; give a non-empty text or use method.init=random")
        ids = (ids * -(-num_virtual_tokens // len(ids)))[:num_virtual_tokens]
        with torch.no_grad():
            vectors = model.get_input_embeddings()(torch.tensor(ids, device=model.device))  # [V, H]
            peft_model.prompt_encoder["default"].embedding.weight.copy_(vectors)
    return peft_model
