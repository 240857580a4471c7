"""The discovery forward: one short row of token ids through the model with hooks on its decoder blocks,
recording each module's first call (its hidden-state input and output) and which modules were running when
the model computed attention weights (a `scaled_dot_product_attention` call, or a softmax over the keys of a
[B, H, T, S] score tensor). modeling/discovery.py reads the model's structure off these records."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

PROBE_LENGTH = 6  # tokens in each discovery input


class StructureError(ValueError):
    """A part of the model that could not be found (or a `model.structure` path that does not resolve)."""


SOFTMAXES = (torch.softmax, torch.nn.functional.softmax, torch.Tensor.softmax)


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


@dataclass
class Call:
    """The first call of one module in a discovery forward: its hidden-state input and output (or None)."""

    input: torch.Tensor | None
    output: torch.Tensor | None = None


@dataclass
class BlockTrace:
    """One decoder block in a discovery forward: its modules' first calls by name within the block ("" is the
    block), and the names of those that were running when attention weights were computed."""

    calls: dict[str, Call] = field(default_factory=dict)
    attends: set[str] = field(default_factory=set)
    running: list[str] = field(default_factory=list)


class StopForward(Exception):
    """Raised after the last traced block: the rest of the model is not needed."""


class _AttentionCalls(TorchFunctionMode):
    """Marks the running modules of the current block whenever attention weights are computed."""

    def __init__(self, traces: Sequence[BlockTrace]) -> None:
        super().__init__()
        self.traces = traces

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        result = func(*args, **kwargs)
        dim = kwargs.get("dim", args[1] if len(args) > 1 else None)
        attends = func is torch.nn.functional.scaled_dot_product_attention or (
            func in SOFTMAXES and isinstance(result, torch.Tensor) and result.dim() == 4 and dim in (-1, 3)
        )
        if attends:
            for trace in self.traces:
                trace.attends.update(trace.running)
        return result


def trace(
    bare: nn.Module, blocks: Sequence[nn.Module], first_token: int, anchor: Sequence[BlockTrace] = ()
) -> list[BlockTrace]:
    """Run `bare` on one row of PROBE_LENGTH tokens (its first token chosen by `first_token`) up to the end of
    the last of `blocks`, recording each block's modules (see BlockTrace). With `anchor` (the traces of
    another first token), every block's input takes the anchor's at positions 1.. and keeps its own at
    position 0: each block then sees inputs that differ in the first position only, as the first does."""
    traces = [BlockTrace() for _ in blocks]
    handles = []
    for index, (block, record) in enumerate(zip(blocks, traces, strict=True)):
        for name, module in block.named_modules():

            def before(module, args, kwargs, name=name, record=record, index=index):
                if not name and anchor:
                    args, kwargs = _anchored(args, kwargs, anchor[index].calls[""].input)
                record.running.append(name)
                if name not in record.calls:
                    record.calls[name] = Call(first_hidden(args, kwargs.values()))
                return (args, kwargs) if not name and anchor else None

            def after(module, args, kwargs, output, name=name, record=record, last=block is blocks[-1]):
                record.running.remove(name)
                call = record.calls[name]
                if call.output is None:
                    call.output = first_hidden((output,), ())
                if not name and last:
                    raise StopForward

            handles.append(module.register_forward_pre_hook(before, with_kwargs=True))
            handles.append(module.register_forward_hook(after, with_kwargs=True))
    try:
        with _AttentionCalls(traces):
            probe_forward(bare, first_token)
    finally:
        for handle in handles:
            handle.remove()
    if any("" not in record.calls for record in traces):
        raise StructureError("a decoder block was never called")
    return traces


def _anchored(args: tuple, kwargs: dict, anchor: torch.Tensor | None) -> tuple[tuple, dict]:
    """`args`, `kwargs` with the block's hidden-state input [1, T, H] taking `anchor`'s positions 1..."""
    for position, value in [*enumerate(args), *kwargs.items()]:
        if isinstance(value, torch.Tensor) and anchor is not None and value.shape == anchor.shape:
            value = torch.cat([value[:, :1], anchor[:, 1:].to(value)], dim=1)
            if isinstance(position, int):
                return (*args[:position], value, *args[position + 1 :]), kwargs
            return args, {**kwargs, position: value}
    return args, kwargs


def probe_forward(bare: nn.Module, first_token: int) -> None:
    """One no-grad, eval-mode forward of `bare` on one row of PROBE_LENGTH token ids from the middle of the
    vocabulary (`first_token` varies only the first id); a hook may end it early with StopForward. Training
    flags are kept."""
    vocab = getattr(bare.config, "vocab_size", None) or input_embeddings(bare).num_embeddings
    input_ids = (torch.arange(PROBE_LENGTH) + vocab // 2) % vocab
    input_ids[0] = (input_ids[0] + 1 + first_token) % vocab
    modes = {module: module.training for module in bare.modules()}
    bare.eval()
    try:
        with torch.no_grad():
            bare(input_ids=input_ids.to(next(bare.parameters()).device)[None])
    except StopForward:
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
