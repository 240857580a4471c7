"""Finding where a decoder-only model keeps its blocks, attention, MLP and MLP output projection.

Nothing is looked up by model name or type; the parts are found from the module tree and one short forward
pass, so a transformers-native family lmlab never named and a remote-code model are handled alike:

- blocks: the ModuleList that holds the most parameters (the repeated decoder blocks; an expert list sits
  inside a block and holds fewer);
- attention: the part of the first block that mixes positions. Two one-row inputs that differ only in their
  first token run through the model, stopped after the first block: the attention is the outermost module
  below the block whose input is the same at every later position while its output is not. Projections, norms
  and the MLP act on each position alone, so none of them passes;
- MLP output projection: the one linear map outside the attention from another width back to the block's
  hidden width (the matrix MEMIT edits and GradSim differentiates; a router reads the hidden width, so it is
  not one); its weight layout, nn.Linear's [out, in] or GPT-2's Conv1D [in, out], is read off the widths it
  was called with;
- MLP: the outermost module of the block that holds that projection but not the attention (OPT keeps fc1 and
  fc2 directly in its block: its MLP is fc2).

`model.structure` in a model config states any of these paths by hand, for a model where discovery is
ambiguous (modeling/architecture.py `attach` checks them against the built model).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

PARTS = ("blocks", "attention", "mlp", "mlp_output")


PROBE_LENGTH = 6  # tokens in each discovery input


class StructureError(ValueError):
    """A part of the model that could not be found (or a `model.structure` path that does not resolve)."""


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

    def part(self, name: str) -> str:
        """The path of part `name`; a StructureError that says how to state it when it was not found."""
        path = getattr(self, name)
        if path is None:
            raise StructureError(
                f"{self.unresolved.get(name, f'no {name} found')}; state it in the model config: "
                f"model.structure.{name}=<dotted path inside a block>"
            )
        return path


def bare_model(model: nn.Module) -> nn.Module:
    """The HF model under a peft wrapper (or the model itself)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def input_embeddings(model: nn.Module) -> nn.Embedding:
    """The token embedding layer: the model's own `get_input_embeddings`, else its nn.Embedding of vocabulary
    size."""
    bare = bare_model(model)
    try:
        return bare.get_input_embeddings()
    except (AttributeError, NotImplementedError):
        vocab = getattr(bare.config, "vocab_size", None)
        for module in bare.modules():
            if isinstance(module, nn.Embedding) and module.num_embeddings == vocab:
                return module
        raise StructureError(
            f"{type(bare).__name__}: no input embedding layer of {vocab} tokens found"
        ) from None


def discover(model: nn.Module, blocks_path: str | None = None) -> Structure:
    """Find the blocks, attention, MLP and MLP output projection of `model` (see the module docstring)."""
    bare = bare_model(model)
    blocks_path = blocks_path or _find_blocks(bare)
    block = bare.get_submodule(blocks_path)[0]
    try:
        calls = [_trace(bare, block, first_token) for first_token in (0, 1)]
    except Exception as error:
        # any model may refuse a plain forward on token ids; the parts are then stated by hand
        why = f"a forward pass of {type(bare).__name__} on {PROBE_LENGTH} token ids failed ({error})"
        return Structure(blocks_path, unresolved=dict.fromkeys(("attention", "mlp", "mlp_output"), why))
    unresolved: dict[str, str] = {}
    attention = _find_attention(block, *calls, unresolved)
    mlp_output, conv1d = _find_mlp_output(block, calls[0], attention, unresolved)
    mlp = None
    if mlp_output is not None:
        mlp = next(
            prefix for prefix in _prefixes(mlp_output) if attention is None or not _inside(attention, prefix)
        )
    elif "mlp_output" in unresolved:
        unresolved["mlp"] = unresolved["mlp_output"]
    return Structure(blocks_path, attention, mlp, mlp_output, conv1d, unresolved)


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


@dataclass
class _Call:
    """The first call of one module during a discovery forward: its hidden-state input and output (or
    None)."""

    input: torch.Tensor | None
    output: torch.Tensor | None = None


class _StopForward(Exception):
    """Raised after the first block: the rest of the model is not needed."""


def _trace(bare: nn.Module, block: nn.Module, first_token: int) -> dict[str, _Call]:
    """Run `bare` on one row of PROBE_LENGTH tokens (its first token chosen by `first_token`) up to the end of
    `block`; return each of the block's modules' first call, by name within the block ("" is the block)."""
    calls: dict[str, _Call] = {}
    handles = []
    for name, module in block.named_modules():

        def before(module, args, kwargs, name=name):
            if name not in calls:
                calls[name] = _Call(first_hidden(args, kwargs.values()))

        def after(module, args, kwargs, output, name=name):
            call = calls[name]
            if call.output is None:
                call.output = first_hidden((output,), ())
            if not name:
                raise _StopForward

        handles.append(module.register_forward_pre_hook(before, with_kwargs=True))
        handles.append(module.register_forward_hook(after, with_kwargs=True))
    try:
        probe_forward(bare, first_token)
    finally:
        for handle in handles:
            handle.remove()
    if "" not in calls:
        raise StructureError("the first decoder block was never called")
    return calls


def probe_forward(bare: nn.Module, first_token: int) -> None:
    """One no-grad, eval-mode forward of `bare` on one row of PROBE_LENGTH token ids from the middle of the
    vocabulary (`first_token` varies only the first id); a hook may end it early with _StopForward. Training
    flags are kept."""
    vocab = getattr(bare.config, "vocab_size", None) or input_embeddings(bare).num_embeddings
    input_ids = (torch.arange(PROBE_LENGTH) + vocab // 2) % vocab
    input_ids[0] = (input_ids[0] + 1 + first_token) % vocab
    modes = {module: module.training for module in bare.modules()}
    bare.eval()
    try:
        with torch.no_grad():
            bare(input_ids=input_ids.to(next(bare.parameters()).device)[None])
    except _StopForward:
        pass
    finally:
        for module, training in modes.items():
            module.training = training


def first_hidden(args: Any, kwargs: Any) -> torch.Tensor | None:
    """A copy of the first floating tensor of one row and PROBE_LENGTH positions among `args` then `kwargs` (a
    module's input or output: tensors, tuples, lists and model outputs), with the positions on axis 1."""
    for value in [*args, *kwargs]:
        if isinstance(value, torch.Tensor):
            if value.is_floating_point() and value.dim() >= 2:
                # copied: a caller may add to it in place after the hook saw it
                if value.shape[0] == 1 and value.shape[1] == PROBE_LENGTH:
                    return value.detach().clone()
                if value.shape[0] == PROBE_LENGTH and value.shape[1] == 1:  # sequence-first layouts
                    return value.detach().transpose(0, 1).clone()
                if value.dim() == 2 and value.shape[0] == PROBE_LENGTH:  # batch and positions flattened
                    return value.detach()[None].clone()
        elif isinstance(value, (tuple, list, Mapping)):
            found = first_hidden(value.values() if isinstance(value, Mapping) else value, ())
            if found is not None:
                return found
    return None


def _find_attention(
    block: nn.Module, first: dict[str, _Call], second: dict[str, _Call], unresolved: dict[str, str]
) -> str | None:
    mixing = []
    for name, call in first.items():
        other = second.get(name)
        if not name or other is None or None in (call.input, call.output, other.input, other.output):
            continue
        if call.output.shape != other.output.shape or call.input.shape != other.input.shape:
            continue
        same_input = torch.equal(call.input[:, 1:], other.input[:, 1:])
        scale = call.output[:, 1:].abs().max().clamp(min=1e-12)
        output_moved = (call.output[:, 1:] - other.output[:, 1:]).abs().max() > 1e-6 * scale
        if same_input and output_moved:
            mixing.append(name)
    if not mixing:
        unresolved["attention"] = (
            f"no module of {type(block).__name__} mixes positions (a block without attention, "
            "or one computed outside its modules)"
        )
        return None
    depth = min(name.count(".") for name in mixing)
    outermost = [name for name in mixing if name.count(".") == depth]
    if len(outermost) > 1:
        unresolved["attention"] = (
            f"several modules of {type(block).__name__} mix positions: {', '.join(outermost)}"
        )
        return None
    return outermost[0]


def _find_mlp_output(
    block: nn.Module, calls: dict[str, _Call], attention: str | None, unresolved: dict[str, str]
) -> tuple[str | None, bool]:
    width = calls[""].input.shape[-1] if calls[""].input is not None else None
    writers = []
    for name, module in outermost_linears(block):
        call = calls.get(name)
        if (
            call is None
            or call.input is None
            or call.output is None
            or (attention and _inside(attention, name))
        ):
            continue
        # from another (the inner) width to the hidden one
        if call.output.shape[-1] == width != call.input.shape[-1]:
            writers.append((name, module, call.input.shape[-1]))
    if len(writers) != 1:
        found = ", ".join(name for name, *_ in writers) or "none"
        unresolved["mlp_output"] = (
            f"expected one linear map from an inner width back to the hidden width ({width}) "
            f"outside the attention of {type(block).__name__}, found {found}"
        )
        return None, False
    name, module, inputs = writers[0]
    # the widths it was called with tell the layout
    return name, tuple(module.weight.shape) == (
        inputs,
        width,
    )


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
    """`a`, `a.b`, `a.b.c` for `a.b.c`: the module's ancestors within the block, outermost first, then
    itself."""
    pieces = name.split(".")
    return [".".join(pieces[: i + 1]) for i in range(len(pieces))]
