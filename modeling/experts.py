"""The mixture-of-experts parts of a decoder block, found in the module tree (no model names or types):

- experts: a module (not a convolution) holding 3-D parameters, one matrix per expert (transformers 5 stores
  Mixtral's, Qwen-MoE's, OLMoE's, GPT-OSS's experts fused so), or a ModuleList of two or more modules of one
  class that hold linear maps (modular experts: MiniMind's list of FeedForward);
- the MoE layer: the module that holds the experts;
- routers: the MoE layer's own children with a 2-D weight (the gate that scores the experts, and a shared
  expert's scalar gate): they read the hidden state and decide where it goes, so LoRA leaves them out;
- the expert router: the router with one output per expert, whose top-k choices are the expert load.

`ExpertLoad` counts, per MoE layer, the tokens the router sends to each expert: the top-k of the router's
logits, recomputed from its input and weight, so it is the same count for every router implementation.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from modeling.architecture import StructureError, bare_model, decoder_blocks
from modeling.expert_layers import expert_layers, router_weight


def _blocks(model: nn.Module) -> list[nn.Module]:
    """The decoder blocks of `model`; none for a model without a list of blocks (it has no experts either)."""
    try:
        return list(decoder_blocks(model))
    except StructureError:
        return []


def has_experts(model: nn.Module) -> bool:
    """Whether any decoder block of `model` is a mixture of experts."""
    return any(expert_layers(block) for block in _blocks(model))


def fused_expert_parameters(model: nn.Module) -> list[str]:
    """Paths within a block of the fused experts' 3-D parameters (peft's `target_parameters`)."""
    layers = [layer for block in _blocks(model) for layer in expert_layers(block)]
    return sorted({name for layer in layers for name in layer.fused})


def expert_routers(model: nn.Module) -> list[tuple[int, nn.Module, int]]:
    """(block index, router, number of experts) of every MoE layer's expert router."""
    found = []
    for index, block in enumerate(_blocks(model)):
        for layer in expert_layers(block):
            scorers = [
                block.get_submodule(path)
                for path in layer.routers
                if router_weight(block.get_submodule(path)).shape[0] == layer.count
            ]
            if len(scorers) == 1:
                found.append((index, scorers[0], layer.count))
    return found


class ExpertLoad:
    """Tokens routed to each expert of each MoE layer while `counting()` is active: the top-k
    (`num_experts_per_tok`, else 1) of the router's logits at every real token."""

    def __init__(self, model: nn.Module) -> None:
        self.routers = expert_routers(model)
        self.top_k = getattr(bare_model(model).config, "num_experts_per_tok", None) or 1
        self.counts: dict[int, torch.Tensor] = {}
        self._real: torch.Tensor | None = None

    @contextmanager
    def counting(self, attention_mask: torch.Tensor | None = None) -> Iterator[None]:
        """Count the routing of the forwards inside the block (`attention_mask` [B, T] marks real tokens)."""
        self.counts, self._real = {}, attention_mask
        handles = [
            router.register_forward_pre_hook(lambda module, args, i=i, n=n: self._count(module, args, i, n))
            for i, router, n in self.routers
        ]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()

    @torch.no_grad()
    def _count(self, router: nn.Module, args: tuple, layer: int, experts: int) -> None:
        tokens = args[0].reshape(-1, args[0].shape[-1])  # [N, H]
        if self._real is not None and self._real.numel() == len(tokens):
            tokens = tokens[self._real.flatten().bool()]
        bias = getattr(router, "bias", None)
        logits = F.linear(
            tokens.float(), router_weight(router).float(), None if bias is None else bias.float()
        )
        chosen = logits.topk(min(self.top_k, experts), dim=-1).indices.flatten()
        counts = torch.bincount(chosen, minlength=experts)
        self.counts[layer] = self.counts.get(layer, 0) + counts

    def shares(self) -> dict[int, torch.Tensor]:
        """Per MoE layer (block index), the share [E] of the counted tokens each expert received (they sum to
        top-k)."""
        return {
            layer: counts.float() * min(self.top_k, len(counts)) / counts.sum().clamp(min=1)
            for layer, counts in self.counts.items()
        }


def aux_loss_weight(model: nn.Module, coef: float | None) -> float:
    """The weight of `model`'s router auxiliary loss in the training loss: `coef` when set, else the model
    config's `router_aux_loss_coef`, else 1 (a model whose output carries `aux_loss` already weighted, as
    MiniMind's does); 0 for a model without experts."""
    if not has_experts(model):
        return 0.0
    if coef is not None:
        return float(coef)
    return float(getattr(bare_model(model).config, "router_aux_loss_coef", 1.0))


def router_inputs(model: nn.Module) -> dict[str, bool]:
    """The forward argument that makes a transformers MoE model return its `aux_loss` (its config has
    `output_router_logits`); none for a model that returns it anyway."""
    return {"output_router_logits": True} if hasattr(bare_model(model).config, "output_router_logits") else {}
