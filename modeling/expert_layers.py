"""The MoE layers of one decoder block, found in its module tree (modeling/experts.py says what each part is;
discovery uses this to find a mixture's MLP and its dense output projection)."""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class ExpertLayer:
    """One MoE layer of a block: paths within the block of the layer, its experts and its routers; the
    experts' 3-D parameters (empty for modular experts) and how many experts there are."""

    path: str
    experts: str
    fused: tuple[str, ...]
    routers: tuple[str, ...]
    count: int


def expert_layers(block: nn.Module) -> list[ExpertLayer]:
    """The MoE layers of one decoder block (none for a dense block)."""
    found = []
    for name, module in block.named_modules():
        fused = tuple(key for key, p in module.named_parameters(recurse=False) if p.dim() == 3)
        if fused and not isinstance(module, nn.modules.conv._ConvNd):  # a convolution's kernel is 3-D too
            count = module.get_parameter(fused[0]).shape[0]
        elif _is_expert_list(module):
            count = len(module)
        else:
            continue
        name = re.sub(r"(\.base_layer)+$", "", name)  # peft wraps fused experts, once per adapted parameter
        path, _, child = name.rpartition(".")
        if not name or any(_inside(layer.experts, name) for layer in found):
            continue
        owner = block.get_submodule(path)
        routers = tuple(
            _join(path, key)
            for key, sub in owner.named_children()
            if key != child and router_weight(sub) is not None and router_weight(sub).dim() == 2
        )
        found.append(ExpertLayer(path, name, tuple(f"{name}.{key}" for key in fused), routers, count))
    return found


def _is_expert_list(module: nn.Module) -> bool:
    return (
        isinstance(module, nn.ModuleList)
        and len(module) >= 2
        and len({type(expert) for expert in module}) == 1
        and any(p.dim() == 2 for p in module[0].parameters())
    )


def router_weight(module: nn.Module) -> torch.Tensor | None:
    """The weight of `module` (of the layer a peft wrapper holds), or None."""
    weight = getattr(getattr(module, "base_layer", module), "weight", None)
    return weight if isinstance(weight, torch.Tensor) else None


def _inside(outer: str, name: str) -> bool:
    return name == outer or name.startswith(outer + ".")


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key
