"""The sites the causal analyses read and write (analysis/interventions.py), found in any model by the
structure modeling/architecture.py discovers, never by module names:

- `block`: a decoder block's output (the residual stream after the block);
- `attention`: the attention module's output (blocks with attention only, in a hybrid);
- `mlp`: the MLP's output (a mixture of experts' whole MoE layer, which every token passes through);
- `mixer`: a hybrid's other position mixer (state-space or convolution layer), in the blocks without
  attention;
- `head`: the input of the attention's output projection (the last linear map the attention calls that
  writes the hidden width), whose `num_attention_heads` equal slices are the heads' outputs.

A kind a model lacks is refused by name.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from modeling.architecture import attention_layers, decoder_blocks, has_submodule, structure
from modeling.discovery import StructureError, bare_model, outermost_linears
from modeling.probe import probe_forward

SITE_KINDS = ("block", "attention", "mlp", "mixer", "head")
# the kinds read and written at a module's input rather than its output
INPUT_KINDS = {"head"}
OUTPUT_PROJECTION_ATTR = "lmlab_output_projection"
Site = tuple[str, int]  # (kind, layer)
# per site: the rows, the positions and the values [n, d] written there, and optionally the columns [n, d]
# (bool) to write (the others keep their value)
Edits = Mapping[Site, tuple[torch.Tensor, ...]]


def site_modules(model: nn.Module, kind: str) -> dict[int, nn.Module]:
    """The module of every layer that has a site of `kind`, by layer index; a kind the model lacks is refused
    by name."""
    blocks, found = decoder_blocks(model), structure(model)
    name = type(model).__name__
    if kind == "block":
        return dict(enumerate(blocks))
    if kind == "attention":
        path = found.part("attention")
        return {i: blocks[i].get_submodule(path) for i in attention_layers(model)}
    if kind == "mlp":
        path = found.part("mlp")
        return {i: block.get_submodule(path) for i, block in enumerate(blocks) if has_submodule(block, path)}
    if kind == "mixer":
        mixers = {i: m for i, m in enumerate(found.mixers) if m is not None and m != found.attention}
        if not mixers:
            raise StructureError(
                f"analysis.sites: {name} has no position mixer besides attention (the `mixer` site is a "
                "hybrid's state-space or convolution layer); its sites: block, attention, mlp"
            )
        return {i: blocks[i].get_submodule(path) for i, path in mixers.items()}
    if kind == "head":
        attention = site_modules(model, "attention")
        path = output_projection(model)
        return {i: module.get_submodule(path) for i, module in attention.items()}
    raise StructureError(f"analysis.sites: unknown site kind {kind!r}; the kinds are {', '.join(SITE_KINDS)}")


def output_projection(model: nn.Module) -> str:
    """The path, within an attention module, of its output projection: the last linear map the first
    attention module calls whose output has the attention's own output width (found once by a forward pass,
    kept on the model); refused by name where there is none."""
    bare = bare_model(model)
    found = getattr(bare, OUTPUT_PROJECTION_ATTR, None)
    if found is not None:
        return found
    attention = next(iter(site_modules(model, "attention").values()))
    calls: list[tuple[str, int]] = []  # (linear map, output width) in call order; the attention's own last
    watched = [(name, module) for name, module in outermost_linears(attention)] + [("", attention)]
    handles = [
        module.register_forward_hook(lambda m, a, output, name=name: calls.append((name, _width(output))))
        for name, module in watched
    ]
    try:
        probe_forward(bare, 0)
    finally:
        for handle in handles:
            handle.remove()
    width = next((out for name, out in calls if name == ""), None)
    writers = [name for name, out in calls if name and out == width]
    if not writers:
        raise StructureError(
            f"analysis.sites: {type(attention).__name__} calls no linear map that writes its output width, "
            "so its heads cannot be told apart (the `head` site)"
        )
    setattr(bare, OUTPUT_PROJECTION_ATTR, writers[-1])
    return writers[-1]


def _width(output: Any) -> int:
    return (output[0] if isinstance(output, (tuple, list)) else output).shape[-1]


def heads_of(model: nn.Module) -> int:
    """How many heads the output projection's input is split into: the model's `num_attention_heads`."""
    config = bare_model(model).config
    heads = getattr(config, "num_attention_heads", None)
    if not heads:
        raise StructureError(f"{type(config).__name__} states no num_attention_heads (the `head` site)")
    return int(heads)


def hidden_of(output: Any, batch: int) -> torch.Tensor:
    """The hidden states [B, T, d] in a module's output (a tensor, or the first element of a tuple; batch and
    positions flattened as OPT does are unflattened)."""
    value = output[0] if isinstance(output, (tuple, list)) else output
    if not isinstance(value, torch.Tensor):
        raise StructureError(f"a site's output is {type(value).__name__}, not a tensor of hidden states")
    return value if value.dim() == 3 else value.view(batch, -1, value.shape[-1])


def with_hidden(output: Any, hidden: torch.Tensor) -> Any:
    """`output` with its hidden states replaced by `hidden` (in the output's own layout)."""
    value = output[0] if isinstance(output, (tuple, list)) else output
    hidden = hidden.view(value.shape)
    if isinstance(output, tuple):
        return (hidden, *output[1:])
    if isinstance(output, list):
        return [hidden, *output[1:]]
    return hidden
