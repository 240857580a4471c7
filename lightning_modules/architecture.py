"""Where each model family keeps its decoder blocks, attention, MLP output projection, and its weight layout.

Every method and analysis that reaches inside a model asks here (adapters, MEMIT, GradSim, the attention maps,
FSDP's wrap units), keyed on the family that `conf/model_family/<family>.yaml` names and that the built model
reports as its `config.model_type`. Adding a model family is one family config plus one `FAMILIES` entry;
tests/test_models.py checks every entry against a model of that family.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class Architecture:
    """The attribute paths of one family's modules (dotted, relative to the HF model or to one block)."""

    blocks: str  # the ModuleList of decoder blocks, from the bare HF model
    attention: str  # a block's self-attention module
    mlp: str  # a block's MLP
    mlp_output: str  # a block's MLP output projection (the matrix MEMIT edits, GradSim differentiates)
    conv1d: bool  # weights stored [in, out] (GPT-2's Conv1D) instead of nn.Linear's [out, in]


_LLAMA = Architecture(blocks="model.layers", attention="self_attn", mlp="mlp", mlp_output="mlp.down_proj", conv1d=False)
FAMILIES: dict[str, Architecture] = {
    "llama": _LLAMA,
    "diffllama": _LLAMA,
    "qwen2": _LLAMA,
    "gpt2": Architecture(blocks="transformer.h", attention="attn", mlp="mlp", mlp_output="mlp.c_proj", conv1d=True),
}


class UnknownArchitectureError(ValueError):
    """A model whose family lightning_modules/architecture.py does not describe."""


def bare_model(model: nn.Module) -> nn.Module:
    """The HF model under a peft wrapper (or the model itself)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def family(model: nn.Module) -> str:
    """The family of a built model: its `config.model_type`."""
    return getattr(getattr(bare_model(model), "config", None), "model_type", None) or type(bare_model(model)).__name__


def of(model: nn.Module) -> Architecture:
    """The architecture facts of `model`'s family; an error that says where to add an unknown one."""
    name = family(model)
    if name not in FAMILIES:
        raise UnknownArchitectureError(
            f"model family '{name}' ({type(bare_model(model)).__name__}) is not described in "
            f"lightning_modules/architecture.py (known: {sorted(FAMILIES)}); add a FAMILIES entry naming its "
            "decoder blocks, attention, MLP and MLP output projection"
        )
    return FAMILIES[name]


def decoder_blocks(model: nn.Module) -> nn.ModuleList:
    """The decoder blocks of `model`, in order."""
    return bare_model(model).get_submodule(of(model).blocks)


def attention_modules(model: nn.Module) -> list[nn.Module]:
    """The self-attention module of every block, in order."""
    path = of(model).attention
    return [block.get_submodule(path) for block in decoder_blocks(model)]


def block_parts(model: nn.Module) -> list[tuple[nn.Module, nn.Module, nn.Module]]:
    """(block, attention, MLP) of every decoder block, in order."""
    facts = of(model)
    return [(block, block.get_submodule(facts.attention), block.get_submodule(facts.mlp)) for block in decoder_blocks(model)]


def mlp_output_modules(model: nn.Module, layers: list[int]) -> list[tuple[str, nn.Module, bool]]:
    """(name in the bare model, module, weights stored [in, out]) of the MLP output projection of each of `layers`."""
    facts, blocks = of(model), decoder_blocks(model)
    return [(f"{facts.blocks}.{i}.{facts.mlp_output}", blocks[i].get_submodule(facts.mlp_output), facts.conv1d) for i in layers]


def block_classes(model: nn.Module) -> set[type[torch.nn.Module]]:
    """The module classes of the decoder blocks (FSDP's wrap units)."""
    return {type(block) for block in decoder_blocks(model)}
