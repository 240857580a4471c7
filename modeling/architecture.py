"""The parts of a decoder-only model that methods and analyses reach for: its decoder blocks, attention, MLP
and MLP output projection (found in the model by modeling/discovery.py, or stated in `model.structure` and
checked here), the final hidden states and the embedding layer.

Every method and analysis that reaches inside a model asks here (adapters, LoRA's default targets, MEMIT,
GradSim, the attention maps, FSDP's wrap units); nothing is looked up by model name or type. The structure is
found once per loaded model and kept on it.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from modeling.discovery import (
    PARTS,
    Structure,
    StructureError,
    discover,
    first_hidden,
    has_submodule,
    is_conv1d,
    probe_forward,
)
from modeling.discovery import bare_model as bare_model
from modeling.discovery import input_embeddings as input_embeddings

log = logging.getLogger(__name__)

STRUCTURE_ATTR = "lmlab_structure"
FINAL_HIDDEN_ATTR = "lmlab_final_hidden"


def structure(model: nn.Module) -> Structure:
    """The structure of `model`: the one attached at load (`attach`), else discovered now and kept on the
    model."""
    return _kept(bare_model(model), STRUCTURE_ATTR, discover)


def _kept(bare: nn.Module, attribute: str, find: Callable[[nn.Module], Any]) -> Any:
    """What `find(bare)` gives, computed once per model and kept on it as `attribute`."""
    found = getattr(bare, attribute, None)
    if found is None:
        found = find(bare)
        setattr(bare, attribute, found)
    return found


def attach(model: nn.Module, stated: Mapping[str, Any] | None) -> Structure:
    """Discover `model`'s structure, override it with the paths `stated` (a `model.structure` node) after
    checking that each resolves in every block, and keep the result on the model."""
    bare = bare_model(model)
    stated = {key: value for key, value in (stated or {}).items() if value is not None}
    unknown = sorted(set(stated) - set(PARTS))
    if unknown:
        raise StructureError(
            f"model.structure.{unknown[0]}: not a structure key; the keys are {', '.join(PARTS)}"
        )
    if "blocks" in stated:
        _resolve(bare, str(stated["blocks"]), "model.structure.blocks", bare)
    found = discover(bare, stated.get("blocks"))
    paths = {part: getattr(found, part) for part in PARTS} | {
        part: str(path) for part, path in stated.items()
    }
    blocks = bare.get_submodule(paths["blocks"])
    for part in ("attention", "mlp", "mlp_output"):
        if part in stated:
            # a hybrid has attention in some blocks only: the first that has it is checked
            present = [i for i, block in enumerate(blocks) if has_submodule(block, paths[part])]
            checked = present[:1] if part == "attention" and present else range(len(blocks))
            for index in checked:
                _resolve(
                    blocks[index], paths[part], f"model.structure.{part}", bare, f"{paths['blocks']}.{index}"
                )
    conv1d = (
        is_conv1d(blocks[0].get_submodule(paths["mlp_output"])) if "mlp_output" in stated else found.conv1d
    )
    unresolved = {part: why for part, why in found.unresolved.items() if part not in stated}
    mixers = () if "attention" in stated or "blocks" in stated else found.mixers
    result = Structure(
        paths["blocks"], paths["attention"], paths["mlp"], paths["mlp_output"], conv1d, unresolved, mixers
    )
    setattr(bare, STRUCTURE_ATTR, result)
    return result


def decoder_blocks(model: nn.Module) -> nn.ModuleList:
    """The decoder blocks of `model`, in order."""
    return bare_model(model).get_submodule(structure(model).blocks)


def attention_layers(model: nn.Module) -> list[int]:
    """The indices of the decoder blocks that have attention (all of them but in a hybrid, whose other
    blocks mix positions with a state-space or convolution layer)."""
    return _blocks_with(model, structure(model).part("attention"))


def attention_blocks(model: nn.Module) -> dict[str, list[int]]:
    """Which decoder blocks have attention and which do not (a hybrid's), as results state it; a hybrid is
    also said in the log."""
    attending = attention_layers(model)
    without = [i for i in range(len(decoder_blocks(model))) if i not in attending]
    if without:
        log.info("attention in blocks %s; blocks %s mix positions without it", attending, without)
    return {"attention_blocks": attending, "blocks_without_attention": without}


def attention_modules(model: nn.Module) -> list[nn.Module]:
    """The self-attention module of every block that has one, in order."""
    path, blocks = structure(model).part("attention"), decoder_blocks(model)
    return [blocks[i].get_submodule(path) for i in attention_layers(model)]


def block_parts(model: nn.Module) -> list[tuple[nn.Module, nn.Module, nn.Module]]:
    """(block, position mixer, MLP) of every decoder block, in order: the mixer is the attention, or a
    hybrid's state-space or convolution layer in a block without attention."""
    found = structure(model)
    mlp = found.part("mlp")
    mixers = found.mixers or [found.part("attention")] * len(decoder_blocks(model))
    parts = []
    for index, (block, mixer) in enumerate(zip(decoder_blocks(model), mixers, strict=True)):
        if mixer is None:
            raise StructureError(f"{found.blocks}.{index}: no module of the block mixes positions")
        parts.append((block, block.get_submodule(mixer), block.get_submodule(mlp)))
    return parts


def mlp_output_modules(model: nn.Module, layers: list[int]) -> list[tuple[str, nn.Module, bool]]:
    """(name in the bare model, module, weights stored [in, out]) of the MLP output projection of each of
    `layers`."""
    found, blocks = structure(model), decoder_blocks(model)
    check_layers(model, layers, "layers")
    path = found.part("mlp_output")
    return [(f"{found.blocks}.{i}.{path}", blocks[i].get_submodule(path), found.conv1d) for i in layers]


def mlp_output_layers(model: nn.Module) -> list[int]:
    """The indices of the decoder blocks that have the MLP output projection (a hybrid mixture of experts
    has it in its dense blocks only)."""
    return _blocks_with(model, structure(model).part("mlp_output"))


def _blocks_with(model: nn.Module, path: str) -> list[int]:
    """The indices of the decoder blocks that hold a module at `path`."""
    return [i for i, block in enumerate(decoder_blocks(model)) if has_submodule(block, path)]


def check_layers(model: nn.Module, layers: Sequence[int], key: str) -> None:
    """Refuse `layers` (the value of config key `key`) unless each is a decoder block of `model` that has the
    MLP output projection (when one was found), with a StructureError naming the key, the value and the
    model's depth (or the blocks that have it)."""
    depth, name = len(decoder_blocks(model)), type(bare_model(model)).__name__
    bad = [i for i in layers if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < depth]
    if bad:
        raise StructureError(
            f"{key}={list(layers)}: {bad} is not a layer of {name}, which has "
            f"{depth} decoder blocks (layers 0..{depth - 1})"
        )
    path = structure(model).mlp_output
    dense = mlp_output_layers(model) if path else list(range(depth))
    if missing := [i for i in layers if i not in dense]:
        raise StructureError(
            f"{key}={list(layers)}: layer {missing} of {name} has no MLP output projection {path} (a "
            f"mixture of experts without a dense path); the layers that have one: {dense}"
        )


def block_classes(model: nn.Module) -> set[type[nn.Module]]:
    """The module classes of the decoder blocks (FSDP's wrap units)."""
    return {type(block) for block in decoder_blocks(model)}


def final_hidden_module(model: nn.Module) -> tuple[nn.Module, int]:
    """(module, width) whose output is what the LM head reads: the decoder's final norm (or whatever a model
    has in its place), found once by a forward pass and kept on the model. Its output, taken through a hook,
    is the decoder's last hidden state for any model, whether or not its outputs carry `last_hidden_state`."""
    return _kept(bare_model(model), FINAL_HIDDEN_ATTR, _find_final_hidden)


def _find_final_hidden(bare: nn.Module) -> tuple[nn.Module, int]:
    head = bare.get_output_embeddings()
    blocks = set(decoder_blocks(bare).modules())
    watched = [m for m in bare.modules() if m is not bare and m is not head and m not in blocks]
    read: list[torch.Tensor] = []
    finished: list[tuple[nn.Module, torch.Tensor | None]] = []
    handles = [head.register_forward_pre_hook(lambda module, args: read.append(args[0].detach().clone()))]
    handles += [
        m.register_forward_hook(
            lambda module, args, output: finished.append((module, first_hidden((output,), ())))
        )
        for m in watched
    ]
    try:
        probe_forward(bare, 0)
    finally:
        for handle in handles:
            handle.remove()
    for module, output in finished:
        if read and output is not None and output.shape == read[0].shape and torch.equal(output, read[0]):
            return module, int(output.shape[-1])
    raise StructureError(
        f"{type(bare).__name__}: no module outside the decoder blocks outputs what the LM head reads"
    )


def final_hidden_states(model: nn.Module, **inputs: Any) -> torch.Tensor:
    """The decoder's last hidden states [B, T, H] (after its final norm) for `inputs`, taken through a hook on
    the module the LM head reads from, so that no output format is assumed."""
    module, _ = final_hidden_module(model)
    captured: list[torch.Tensor] = []
    handle = module.register_forward_hook(
        lambda m, args, output: captured.append(
            output
            if isinstance(output, torch.Tensor)
            else next(o for o in output if isinstance(o, torch.Tensor))
        )
    )
    try:
        model(**inputs)
    finally:
        handle.remove()
    return captured[-1]


def forward_accepts(model: nn.Module, argument: str) -> bool:
    """Whether the forward of `model` (its bare HF model) names `argument` (`**kwargs` may swallow anything,
    so only a named parameter counts)."""
    return argument in inspect.signature(bare_model(model).forward).parameters


def as_sequence(activation: torch.Tensor, batch: int, length: int) -> torch.Tensor:
    """A linear map's input or output as [B, T, d], also where the model flattened batch and positions
    (OPT)."""
    return activation if activation.dim() == 3 else activation.view(batch, length, -1)


def stores_transposed_linears(model: nn.Module) -> bool:
    """Whether the model's linear maps are GPT-2-style Conv1D modules (weights [in, out])."""
    return any(isinstance(module, Conv1D) for module in bare_model(model).modules())


# -- discovery
# -------------------------------------------------------------------------------------------------------


def _resolve(root: nn.Module, path: str, key: str, bare: nn.Module, where: str = "") -> nn.Module:
    try:
        return root.get_submodule(path)
    except AttributeError as error:
        place = where or type(bare).__name__
        children = ", ".join(name for name, _ in root.named_children())
        raise StructureError(
            f"{key}={path}: not found in {place} ({error}); its children are: {children}"
        ) from error
