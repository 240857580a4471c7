"""The logit lens: what each layer's residual stream at the last prompt position would predict, read through
the model's own final norm and output embedding (tied or untied).

The residual after block l replaces the input of the module the LM head reads from (the final norm, found by
modeling/architecture.py) in a one-token forward pass of L rows, so everything after it (the norm, the head,
any logit scaling or soft-capping the model applies) is the model's own code: at the last layer the lens is
the model's next-token distribution.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from analysis.interventions import Interventions
from modeling.architecture import decoder_blocks, final_hidden_module


def lens_entry(model: nn.Module) -> nn.Module:
    """The module whose input the lens replaces: the final norm, or the output embedding where the model
    has no module between its last block and the head."""
    module, _ = final_hidden_module(model)
    blocks = decoder_blocks(model)
    inside = any(m is blocks for m in module.modules())
    return model.get_output_embeddings() if inside else module


def lens(hooks: Interventions, prompt_ids: list[int], token: int | None) -> dict[str, Any]:
    """Per layer, the probability and rank (0 = top) of `token` at the last prompt position of `prompt_ids`
    (None: the model's own greedy next token), with the lens's top token per layer."""
    model = hooks.model
    ids = torch.tensor([prompt_ids], device=model.device)
    sites = {("block", layer) for layer in hooks.sites["block"]}
    final_logits = hooks.run(ids, record=sites)[0, -1].float()  # [V]
    layers = sorted(hooks.sites["block"])
    residuals = torch.stack([hooks.recorded[("block", layer)][0, -1] for layer in layers])  # [L, d]
    token = int(final_logits.argmax()) if token is None else token

    def substitute(module: nn.Module, args: tuple) -> tuple:
        hidden = args[0].clone()  # [L, 1, d] (a prompt-tuned model's virtual tokens first)
        hidden.view(len(layers), -1, hidden.shape[-1])[:, -1] = residuals.to(hidden.dtype)
        return (hidden, *args[1:])

    handle = lens_entry(model).register_forward_pre_hook(substitute)
    try:
        with torch.no_grad():
            logits = model(input_ids=ids[:, -1:].repeat(len(layers), 1)).logits[:, -1].float()  # [L, V]
    finally:
        handle.remove()
    probabilities = logits.softmax(-1)
    chosen = probabilities[:, token]  # [L]
    return {
        "token": token,
        "layers": layers,
        "probability": chosen.tolist(),
        "rank": (probabilities > chosen[:, None]).sum(-1).tolist(),
        "top": probabilities.argmax(-1).tolist(),
        "model_probability": float(final_logits.softmax(-1)[token]),
    }
