"""Where a decoder-only model keeps its blocks, attention, MLP and MLP output projection: found in the model.

Every method and analysis that reaches inside a model asks here (adapters, LoRA's default targets, MEMIT,
GradSim, the attention maps, FSDP's wrap units). Nothing is looked up by model name or type; the parts are
found from the module tree and from one short forward pass, so a transformers-native family lmlab never named
and a remote-code model are handled alike:

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
ambiguous; `attach` checks them against the built model. The discovery runs once per loaded model: the result
is kept on it.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

PARTS = ("blocks", "attention", "mlp", "mlp_output")
STRUCTURE_ATTR = "lmlab_structure"
FINAL_HIDDEN_ATTR = "lmlab_final_hidden"
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
    conv1d: bool = (
        False  # the MLP output projection stores its weight [in, out] (Conv1D) instead of [out, in]
    )
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
            for index, block in enumerate(blocks):
                _resolve(block, paths[part], f"model.structure.{part}", bare, f"{paths['blocks']}.{index}")
    conv1d = (
        _is_conv1d(blocks[0].get_submodule(paths["mlp_output"])) if "mlp_output" in stated else found.conv1d
    )
    unresolved = {part: why for part, why in found.unresolved.items() if part not in stated}
    result = Structure(
        paths["blocks"], paths["attention"], paths["mlp"], paths["mlp_output"], conv1d, unresolved
    )
    setattr(bare, STRUCTURE_ATTR, result)
    return result


def decoder_blocks(model: nn.Module) -> nn.ModuleList:
    """The decoder blocks of `model`, in order."""
    return bare_model(model).get_submodule(structure(model).blocks)


def attention_modules(model: nn.Module) -> list[nn.Module]:
    """The self-attention module of every block, in order."""
    path = structure(model).part("attention")
    return [block.get_submodule(path) for block in decoder_blocks(model)]


def block_parts(model: nn.Module) -> list[tuple[nn.Module, nn.Module, nn.Module]]:
    """(block, attention, MLP) of every decoder block, in order."""
    found = structure(model)
    attention, mlp = found.part("attention"), found.part("mlp")
    return [
        (block, block.get_submodule(attention), block.get_submodule(mlp)) for block in decoder_blocks(model)
    ]


def mlp_output_modules(model: nn.Module, layers: list[int]) -> list[tuple[str, nn.Module, bool]]:
    """(name in the bare model, module, weights stored [in, out]) of the MLP output projection of each of
    `layers`."""
    found, blocks = structure(model), decoder_blocks(model)
    path = found.part("mlp_output")
    return [(f"{found.blocks}.{i}.{path}", blocks[i].get_submodule(path), found.conv1d) for i in layers]


def block_classes(model: nn.Module) -> set[type[nn.Module]]:
    """The module classes of the decoder blocks (FSDP's wrap units)."""
    return {type(block) for block in decoder_blocks(model)}


def block_linear_names(model: nn.Module) -> list[str]:
    """The names of the linear maps (nn.Linear, Conv1D, or a peft layer wrapping one) inside the decoder
    blocks, each as its path within a block (`self_attn.q_proj`), in module order."""
    names: dict[str, None] = {}
    for block in decoder_blocks(model):
        names.update(dict.fromkeys(name for name, _ in _outermost_linears(block)))
    return list(names)


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
            lambda module, args, output: finished.append((module, _hidden((output,), ())))
        )
        for m in watched
    ]
    try:
        _probe_forward(bare, 0)
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
                calls[name] = _Call(_hidden(args, kwargs.values()))

        def after(module, args, kwargs, output, name=name):
            call = calls[name]
            if call.output is None:
                call.output = _hidden((output,), ())
            if not name:
                raise _StopForward

        handles.append(module.register_forward_pre_hook(before, with_kwargs=True))
        handles.append(module.register_forward_hook(after, with_kwargs=True))
    try:
        _probe_forward(bare, first_token)
    finally:
        for handle in handles:
            handle.remove()
    if "" not in calls:
        raise StructureError("the first decoder block was never called")
    return calls


def _probe_forward(bare: nn.Module, first_token: int) -> None:
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


def _hidden(args: Any, kwargs: Any) -> torch.Tensor | None:
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
        elif isinstance(value, (tuple, list)):
            found = _hidden(value, ())
            if found is not None:
                return found
        elif isinstance(value, Mapping):
            found = _hidden(value.values(), ())
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
    for name, module in _outermost_linears(block):
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


def _is_conv1d(module: nn.Module) -> bool:
    return isinstance(getattr(module, "base_layer", module), Conv1D)


def _outermost_linears(block: nn.Module) -> Iterator[tuple[str, nn.Module]]:
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


def _resolve(root: nn.Module, path: str, key: str, bare: nn.Module, where: str = "") -> nn.Module:
    try:
        return root.get_submodule(path)
    except AttributeError as error:
        place = where or type(bare).__name__
        children = ", ".join(name for name, _ in root.named_children())
        raise StructureError(
            f"{key}={path}: not found in {place} ({error}); its children are: {children}"
        ) from error
