"""Which linear maps of the decoder blocks LoRA-family methods can adapt (peft's `all-linear` as lmlab finds
it): routers, layer types peft does not adapt, maps whose weight a fused kernel reads directly, maps peft
itself refuses and linear subclasses whose forward is not x W^T + b are left out, each with its reason."""

from __future__ import annotations

import functools
import inspect
import logging
import re

import torch
from peft import LoraConfig
from peft.tuners.tuners_utils import _check_lora_target_modules_mamba as check_target_modules
from torch import nn
from transformers import PreTrainedModel
from transformers.pytorch_utils import Conv1D

from modeling import architecture
from modeling.discovery import outermost_linears
from modeling.expert_layers import expert_layers

log = logging.getLogger(__name__)


def block_linear_targets(model: PreTrainedModel) -> list[str]:
    """Target names that match exactly the linear maps peft adapts in the decoder blocks, routers and other
    2-D weights left out (said in one log line): their last name components when those match nothing else in
    the model (`q_proj`, ...), else their paths within a block (`self_attn.q_proj`)."""
    adapted: dict[str, None] = {}
    left_out: dict[str, str] = {}
    for block in architecture.decoder_blocks(model):
        routers = {path for layer in expert_layers(block) for path in layer.routers}
        for name, module in outermost_linears(block):
            base = getattr(module, "base_layer", module)  # a peft layer: the map it wraps
            kind = type(base).__name__
            if name in routers:
                left_out[name] = f"{kind}: routes tokens"
            elif not isinstance(base, (nn.Linear, Conv1D)):
                left_out[name] = f"{kind}: not a layer type peft adapts"
            elif not computes_its_weight(base):
                left_out[name] = (
                    f"{kind}: its forward is not x W^T + b, so LoRA's added B A x does not fit it"
                )
            elif weight_read_directly(block, name):
                left_out[name] = "its weight is read directly by a fused kernel path, bypassing an adapter"
            elif refusal := peft_refuses(model, name):
                left_out[name] = f"peft refuses it: {refusal}"
            else:
                adapted[name] = None
    if left_out:
        log.info("LoRA leaves out %s", "; ".join(f"{name} ({why})" for name, why in left_out.items()))
    short = {path.rsplit(".", 1)[-1] for path in adapted}
    inside = re.compile(rf"{re.escape(architecture.structure(model).blocks)}\.\d+\.(.+)")
    clashes = [
        name
        for name, _ in architecture.bare_model(model).named_modules()
        if name.rsplit(".", 1)[-1] in short
        and ((match := inside.fullmatch(name)) is None or match.group(1) not in adapted)
    ]
    return sorted(adapted) if clashes else sorted(short)


def computes_its_weight(layer: nn.Module) -> bool:
    """Whether a linear layer's output is x W^T + b, as LoRA's additive update assumes: true of nn.Linear and
    Conv1D themselves; a subclass with its own forward (DeepSeek-V4's block-diagonal grouped projection) is
    run on a probe input and compared. Weights that are not plain floats (quantized, offloaded) are
    trusted."""
    if type(layer) in (nn.Linear, Conv1D) or type(layer).forward in (nn.Linear.forward, Conv1D.forward):
        return True
    weight = layer.weight
    if not weight.is_floating_point() or weight.device.type == "meta" or weight.ndim != 2:
        return True
    conv1d = isinstance(layer, Conv1D)
    probe = torch.randn(
        2, weight.shape[0] if conv1d else weight.shape[1], dtype=weight.dtype, device=weight.device
    )
    with torch.no_grad():
        try:
            output = layer(probe)
        except RuntimeError:
            return False
        expected = probe @ weight if conv1d else probe @ weight.T
        if getattr(layer, "bias", None) is not None:
            expected = expected + layer.bias
        return output.shape == expected.shape and torch.allclose(output, expected, rtol=1e-3, atol=1e-3)


def peft_refuses(model: PreTrainedModel, name: str) -> str | None:
    """peft's own reason for refusing LoRA on the module `name` of `model` (its check of the modules a
    state-space model's fused kernel reads, e.g. FalconMamba's `out_proj`), None where it accepts it."""
    config = LoraConfig(target_modules=[name])
    try:
        check_target_modules(config, model, name.rsplit(".", 1)[-1])
    except ValueError as error:
        return str(error).split("Incompatible modules")[0].strip()
    return None


def weight_read_directly(block: nn.Module, name: str) -> bool:
    """Whether the code of the module holding `name` (a path within `block`) reads `name`'s weight itself
    (a state-space mixer hands `out_proj.weight` to its fused kernel) instead of calling the module."""
    parent, _, child = name.rpartition(".")
    source = _class_source(type(block.get_submodule(parent)))
    return source is not None and re.search(rf"self\.{re.escape(child)}\.weight\b", source) is not None


@functools.cache
def _class_source(cls: type) -> str | None:
    """The source of `cls`, None where Python cannot find it; read once per class (each read parses its
    file: a 30-block model asks about the same few classes 210 times)."""
    try:
        return inspect.getsource(cls)
    except (OSError, TypeError):
        return None
