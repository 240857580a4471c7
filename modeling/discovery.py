"""Finding where a decoder-only model keeps its blocks, attention, MLP and MLP output projection.

Nothing is looked up by model name or type; the parts are found from the module tree and one short forward
pass, so a transformers-native family lmlab never named and a remote-code model are handled alike:

- blocks: the ModuleList that holds the most parameters (the repeated decoder blocks; an expert list sits
  inside a block and holds fewer);
- position mixer of each block: two one-row inputs that differ only in their first token run through the
  model, the second with every block's input taken from the first at positions 1.. (so each block sees inputs
  that differ in the first position only): the mixer is the outermost module below the block whose input is
  the same at every later position while its output is not. Projections, norms and the MLP act on each
  position alone, so none of them passes;
- attention: the mixer of the first block whose mixer computed attention weights (sdpa, or a softmax over
  keys): in a hybrid the other blocks mix with a state-space or convolution layer, and a parallel hybrid's
  block holds both (the attention is the one that computed weights); without such a call, block 0's mixer.
  The forward stops after block 0 when every block holds its mixer, else (a hybrid) it traces every block;
- MLP output projection: the one linear map outside the mixers from another width back to the block's
  hidden width (the matrix MEMIT edits and GradSim differentiates; a router reads the hidden width, so it is
  not one; in a mixture of experts, the shared expert's: the dense path beside the routed experts, never a
  routed expert's, which sees only the tokens routed to it even where the probe sent it every one); its
  layout, nn.Linear's [out, in] or Conv1D's [in, out], is read off the widths it was called with;
- MLP: the outermost module of the block that holds that projection but no mixer (OPT keeps fc1 and
  fc2 directly in its block: its MLP is fc2); a mixture without a dense path: the MoE layer.

`model.structure` in a model config states any of these paths by hand, for a model where discovery is
ambiguous (modeling/architecture.py `attach` checks them against the built model).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from modeling.expert_layers import expert_layers
from modeling.probe import (
    PROBE_LENGTH,
    BlockTrace,
    Call,
    StructureError,
    bare_model,
    first_hidden,
    input_embeddings,
    probe_forward,
    trace,
)

__all__ = ["StructureError", "bare_model", "first_hidden", "input_embeddings", "probe_forward"]
PARTS = ("blocks", "attention", "mlp", "mlp_output")


@dataclass(frozen=True)
class Structure:
    """Dotted paths of a model's parts: `blocks` from the bare model, the others from one block. A part that
    was not found is None, and `unresolved[part]` says why."""

    blocks: str
    attention: str | None = None
    mlp: str | None = None
    mlp_output: str | None = None
    # the MLP output projection stores its weight [in, out] (Conv1D) instead of [out, in]
    conv1d: bool = False
    unresolved: Mapping[str, str] = field(default_factory=dict)
    # each block's position mixer (its attention; a state-space or convolution mixer in a hybrid's other
    # blocks); empty: the attention path in every block
    mixers: tuple[str | None, ...] = ()

    def part(self, name: str) -> str:
        """The path of part `name`; a StructureError that says how to state it when it was not found."""
        path = getattr(self, name)
        if path is None:
            raise StructureError(
                f"{self.unresolved.get(name, f'no {name} found')}; state it in the model config: "
                f"model.structure.{name}=<dotted path inside a block>"
            )
        return path


def discover(model: nn.Module, blocks_path: str | None = None) -> Structure:
    """Find the blocks, attention, MLP and MLP output projection of `model` (see the module docstring)."""
    bare = bare_model(model)
    blocks_path = blocks_path or _find_blocks(bare)
    blocks = list(bare.get_submodule(blocks_path))
    try:
        first, mixing, found = _mixers(bare, blocks[:1])
        if found[0][0] is None or not all(has_submodule(block, found[0][0]) for block in blocks):
            first, mixing, found = _mixers(bare, blocks)  # a hybrid: every block is traced
    except Exception as error:
        # any model may refuse a plain forward on token ids; the parts are then stated by hand
        why = f"a forward pass of {type(bare).__name__} on {PROBE_LENGTH} token ids failed ({error})"
        return Structure(blocks_path, unresolved=dict.fromkeys(("attention", "mlp", "mlp_output"), why))
    mixers = tuple(name for name, _ in found)
    attending = [i for i, (name, _) in enumerate(found) if name is not None and name in first[i].attends]
    attention, why = found[attending[0] if attending else 0]  # a hybrid's first attention block
    unresolved = {"attention": why} if attention is None else {}
    mlp_output, conv1d = _find_mlp_output(blocks[0], first[0].calls, mixing[0], unresolved)
    mlp, mixtures = None, expert_layers(blocks[0])
    if mlp_output is not None:
        mlp = next(p for p in _prefixes(mlp_output) if not any(_inside(mixer, p) for mixer in mixing[0]))
    elif mixtures:  # experts without a dense output projection: the MoE layer is the MLP
        mlp = mixtures[0].path
        unresolved["mlp_output"] = (
            f"the mixture of experts {mlp} has no dense (shared-expert) output projection"
        )
    elif "mlp_output" in unresolved:
        unresolved["mlp"] = unresolved["mlp_output"]
    hybrid = len(set(mixers)) > 1
    return Structure(blocks_path, attention, mlp, mlp_output, conv1d, unresolved, mixers if hybrid else ())


def _mixers(
    bare: nn.Module, blocks: list[nn.Module]
) -> tuple[list[BlockTrace], list[list[str]], list[tuple[str | None, str]]]:
    """The first discovery trace of `blocks` (the forward stops after the last), each block's outermost
    modules that mix positions (from the two traces), and each block's mixer."""
    first = trace(bare, blocks, 0)
    second = trace(bare, blocks, 1, anchor=first)
    mixing = [_mixing(*traced) for traced in zip(first, second, strict=True)]
    found = [_find_mixer(b, m, t.attends) for b, m, t in zip(blocks, mixing, first, strict=True)]
    return first, mixing, found


def has_submodule(root: nn.Module, path: str) -> bool:
    """Whether `root` holds a module at dotted `path`."""
    try:
        root.get_submodule(path)
    except AttributeError:
        return False
    return True


def _find_blocks(bare: nn.Module) -> str:
    lists = [
        (name, module)
        for name, module in bare.named_modules()
        if isinstance(module, nn.ModuleList) and len(module)
    ]
    sized = [(sum(p.numel() for p in module.parameters()), name) for name, module in lists]
    sized = [entry for entry in sized if entry[0] > 0]
    if not sized:
        raise StructureError(
            f"{type(bare).__name__}: no ModuleList of decoder blocks found; state it in the model "
            "config: model.structure.blocks=<dotted path>"
        )
    return max(sized)[1]


def _mixing(first: BlockTrace, second: BlockTrace) -> list[str]:
    """The outermost modules of a block whose input is the same in both traces at every later position while
    their output is not: the modules that mix positions."""
    mixing = []
    for name, call in first.calls.items():
        other = second.calls.get(name)
        if not name or other is None or None in (call.input, call.output, other.input, other.output):
            continue
        if call.output.shape != other.output.shape or call.input.shape != other.input.shape:
            continue
        same_input = torch.equal(call.input[:, 1:], other.input[:, 1:])
        scale = call.output[:, 1:].abs().max().clamp(min=1e-12)
        output_moved = (call.output[:, 1:] - other.output[:, 1:]).abs().max() > 1e-6 * scale
        if same_input and output_moved:
            mixing.append(name)
    depth = min((name.count(".") for name in mixing), default=0)
    return [name for name in mixing if name.count(".") == depth]


def _find_mixer(block: nn.Module, outermost: list[str], attends: set[str]) -> tuple[str | None, str]:
    """(the one of `block`'s `outermost` position-mixing modules that is its mixer, or None; why not). Of
    several (a parallel hybrid), the one that computed attention weights (`attends`)."""
    if not outermost:
        kind = type(block).__name__
        return None, f"no module of {kind} mixes positions (no attention, or one outside its modules)"
    attending = [name for name in outermost if name in attends]
    if len(outermost) > 1 and len(attending) != 1:
        return None, f"several modules of {type(block).__name__} mix positions: {', '.join(outermost)}"
    return (attending or outermost)[0], ""


def _find_mlp_output(
    block: nn.Module, calls: dict[str, Call], mixing: list[str], unresolved: dict[str, str]
) -> tuple[str | None, bool]:
    width = calls[""].input.shape[-1] if calls[""].input is not None else None
    writers = []
    for name, module in outermost_linears(block):
        call = calls.get(name)
        if (
            call is None
            or call.input is None
            or call.output is None
            or any(_inside(mixer, name) for mixer in mixing)
        ):
            continue
        # from another (the inner) width to the hidden one
        if call.output.shape[-1] == width != call.input.shape[-1]:
            writers.append((name, module, call.input.shape[-1]))
    routed = [layer.experts for layer in expert_layers(block)]
    dense = [entry for entry in writers if not any(_inside(experts, entry[0]) for experts in routed)]
    # a shared expert: the dense path beside the experts; a routed expert never (it sees only its tokens)
    writers = dense if routed else writers
    if len(writers) != 1:
        found = ", ".join(name for name, *_ in writers) or "none"
        unresolved["mlp_output"] = (
            f"expected one linear map from an inner width back to the hidden width ({width}) "
            f"outside the position mixers of {type(block).__name__}, found {found}"
        )
        return None, False
    name, module, inputs = writers[0]  # the widths it was called with tell the layout
    return name, tuple(module.weight.shape) == (inputs, width)


def is_conv1d(module: nn.Module) -> bool:
    return isinstance(getattr(module, "base_layer", module), Conv1D)


def outermost_linears(block: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """(name within `block`, module) of every linear map not nested in another (a peft layer is one map)."""
    taken: list[str] = []
    for name, module in block.named_modules():
        if not name or any(_inside(outer, name) for outer in taken):
            continue
        weight = getattr(module, "weight", None)
        if isinstance(weight, torch.Tensor) and weight.dim() == 2 and not isinstance(module, nn.Embedding):
            taken.append(name)
            yield name, module


def _inside(outer: str, name: str) -> bool:
    return name == outer or name.startswith(outer + ".")


def _prefixes(name: str) -> list[str]:
    """`a`, `a.b`, `a.b.c` for `a.b.c`: the module's ancestors within the block, then itself."""
    pieces = name.split(".")
    return [".".join(pieces[: i + 1]) for i in range(len(pieces))]
