"""Bottleneck adapters (Houlsby et al. 2019): two per transformer block, the base model frozen.

Each adapter maps the output of a sublayer (self-attention, then the MLP) through
hidden -> bottleneck -> GELU -> hidden and adds it back (x + up(gelu(down(x)))), before the block's own
residual connection. The up-projection starts at zero, so at init the model computes exactly what
the base model computes.

Why our own module and not AdapterHub's `adapters` (the library with `BnConfig`): its current
release (1.3.0) pins `transformers~=4.57`, and lmlab runs on transformers 5.x; peft has no
bottleneck adapters. The adapters attach with forward hooks on the sublayers, so the base
model's parameter names (and its checkpoints) stay untouched; they live as `attention_adapter`
and `mlp_adapter` submodules of each block. The blocks and their sublayers come from
modeling/architecture.py.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from transformers import PreTrainedModel

from lightning_modules.methods import MethodContext
from modeling import architecture

SUPPORTS = ("causal_lm", "label_lm")  # the task modules it can train


class BottleneckAdapter(nn.Module):
    """x + up(gelu(down(x))) with the up-projection initialised to zero (identity at init)."""

    def __init__(self, hidden_size: int, bottleneck: int) -> None:
        super().__init__()
        self.down = nn.Linear(hidden_size, bottleneck)
        self.up = nn.Linear(bottleneck, hidden_size)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:  # [B, T, H] -> [B, T, H]
        return hidden + self.up(nn.functional.gelu(self.down(hidden.to(self.down.weight.dtype)))).to(
            hidden.dtype
        )


def _adapt_output(adapter: BottleneckAdapter):
    def hook(module: nn.Module, args: Any, output: Any) -> Any:
        if isinstance(output, tuple):  # attention: (hidden states, attention weights, ...)
            return (adapter(output[0]), *output[1:])
        return adapter(output)

    return hook


def apply(model: PreTrainedModel, context: MethodContext, bottleneck: int = 8) -> PreTrainedModel:
    """Freeze `model` and add a trainable bottleneck adapter (hidden -> `bottleneck` -> hidden) after each
    attention and each MLP sublayer."""
    blocks = architecture.block_parts(model)
    model.requires_grad_(False)
    parameter = next(model.parameters())
    for block, attention, mlp in blocks:
        if hasattr(block, "attention_adapter"):
            raise ValueError(f"{type(model).__name__} already has adapters; apply method=adapter once")
        for name, sublayer in (("attention_adapter", attention), ("mlp_adapter", mlp)):
            adapter = BottleneckAdapter(model.config.hidden_size, bottleneck).to(parameter.device)
            block.add_module(name, adapter)
            sublayer.register_forward_hook(_adapt_output(adapter))
    return model
