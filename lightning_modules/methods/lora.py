"""LoRA through peft. Target modules default to every linear map of the decoder blocks that peft can adapt
(peft's `all-linear`), routers left out; a mixture of experts whose experts are fused 3-D parameters has those
adapted through peft's `target_parameters` (modeling/experts.py finds both).

The variants are keys of the same method: weight-decomposed DoRA (`use_dora`), rank-stabilised scaling
alpha / sqrt(r) (`use_rslora`), the initialisation (`init`: peft's default, gaussian, PiSSA, OLoRA, EVA from
the task's training batches, LoftQ on a 4-bit base) and LoRA+'s learning rate for B (`loraplus_lr_ratio`, read
by the optimiser from the model: `LR_RATIO_ATTR`). PiSSA and OLoRA move part of the base weights into the
adapter; their exports are converted to a plain LoRA of twice the rank on the unchanged base
(`save_adapter`), so a saved run never needs the changed base."""

from __future__ import annotations

import functools
import inspect
import itertools
import logging
import re
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from omegaconf import DictConfig
from peft import (
    LoraConfig,
    PeftModel,
    get_peft_model,
    prepare_model_for_kbit_training,
)
from peft.tuners.lora import ParamWrapper
from peft.tuners.tuners_utils import _check_lora_target_modules_mamba as check_target_modules
from torch import nn
from transformers import PreTrainedModel
from transformers.pytorch_utils import Conv1D

from lightning_modules.methods import LR_RATIO_ATTR, MethodContext
from modeling import architecture
from modeling.discovery import outermost_linears
from modeling.expert_layers import expert_layers
from modeling.experts import fused_expert_parameters
from modeling.lora_init import (
    RESIDUAL_INITS,
    check_init,
    eva_initialised,
    keep_initial_adapter,
    loftq_initialised,
    variant_options,
)
from modeling.quantization import is_quantized

SUPPORTS = ("causal_lm", "label_lm")  # the task modules it can train

ALL_LINEAR = "all-linear"

log = logging.getLogger(__name__)


def resolve_targets(
    targets: Sequence[str] | str | None, model_cfg: DictConfig | None, model: PreTrainedModel
) -> list[str]:
    """The module names (or name suffixes) LoRA adapts: the method's `targets`, else the model config's
    `lora_target_modules`, else (and for "all-linear") every linear map of `model`'s decoder blocks that peft
    can adapt, routers left out."""
    targets = _chosen(targets, model_cfg)
    if isinstance(targets, str):
        return block_linear_targets(model) if targets == ALL_LINEAR else [targets]
    return [str(name) for name in targets]


def resolve_parameters(
    parameters: Sequence[str] | None,
    targets: Sequence[str] | str | None,
    model_cfg: DictConfig | None,
    model: PreTrainedModel,
) -> list[str]:
    """The 3-D expert parameters LoRA adapts (peft's `target_parameters`): `parameters` when given, else the
    fused experts of the decoder blocks when the target modules are every linear map, else none."""
    if parameters is not None:
        return [str(name) for name in parameters]
    return fused_expert_parameters(model) if _chosen(targets, model_cfg) == ALL_LINEAR else []


def _chosen(targets: Sequence[str] | str | None, model_cfg: DictConfig | None) -> Sequence[str] | str:
    return targets or (model_cfg.get("lora_target_modules") if model_cfg is not None else None) or ALL_LINEAR


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


def lora_config(
    model: PreTrainedModel,
    targets: list[str],
    r: int,
    alpha: float,
    dropout: float,
    parameters: Sequence[str] = (),
    **extra: Any,
) -> LoraConfig:
    """The peft LoraConfig (rank `r`, scaling `alpha / r`) on `targets` of `model` (Conv1D layout where it has
    one) and on the 3-D `parameters` (which peft adapts without dropout: see `with_module_dropout`)."""
    return LoraConfig(
        r=r,
        lora_alpha=alpha,
        lora_dropout=0.0 if parameters else dropout,
        target_modules=targets,
        target_parameters=list(parameters) or None,
        bias="none",
        task_type="CAUSAL_LM",
        fan_in_fan_out=architecture.stores_transposed_linears(model),
        **extra,
    )


def with_module_dropout(model: PeftModel, dropout: float) -> PeftModel:
    """Give every LoRA module adapter (not the parameter adapters of fused experts, where peft cannot apply
    dropout: x is not factored out of the expert matmul) its input dropout back."""
    layers = [
        module
        for module in model.modules()
        if hasattr(module, "lora_dropout") and not isinstance(module, ParamWrapper)
    ]
    for layer in layers:
        for name in layer.lora_dropout:
            layer.lora_dropout[name] = nn.Dropout(dropout)
    log.info("LoRA dropout %s on the module adapters; the fused expert adapters train without it", dropout)
    return model


def set_lr_ratio(model: PeftModel, ratio: float | None) -> PeftModel:
    """Mark `model` for LoRA+ (Hayou et al. 2024): its B matrices train at `ratio` times the learning rate
    (the optimiser reads the mark: lightning_modules/base.py). None leaves one learning rate."""
    if ratio is None:
        return model
    if not ratio > 0:
        raise ValueError(f"method.loraplus_lr_ratio={ratio!r}: expected a positive number (LoRA+ uses 2..16)")
    setattr(model, LR_RATIO_ATTR, {"lora_B": float(ratio)})
    return model


def adapted_model(model: PreTrainedModel, config: LoraConfig, keys: str) -> PeftModel:
    """`get_peft_model` on `config`; what peft refuses is raised again naming the method keys (`keys`) that
    asked for it, with peft's reason."""
    try:
        return get_peft_model(
            model, config, low_cpu_mem_usage=getattr(config, "init_lora_weights", None) == "eva"
        )
    except (ValueError, TypeError, NotImplementedError) as error:
        raise ValueError(f"{keys}: peft cannot apply this to {type(model).__name__}: {error}") from error


def training_batches(model: torch.nn.Module, context: MethodContext, count: int, why: str) -> Iterator[dict]:
    """Up to `count` of the task's training batches on `model`'s device; ValueError saying `why` they are
    needed when the run has no task data."""
    if context.datamodule is None:
        raise ValueError(f"{why} needs the task's training batches, and this run has none")
    context.datamodule.setup("fit")
    device = next(model.parameters()).device
    for batch in itertools.islice(context.datamodule.train_dataloader(), count):
        yield {key: value.to(device) for key, value in batch.items()}


def apply(
    model: PreTrainedModel,
    context: MethodContext,
    r: int = 8,
    alpha: float = 16,
    dropout: float = 0.05,
    target_modules: Sequence[str] | str | None = None,
    target_parameters: Sequence[str] | None = None,
    use_dora: bool = False,
    use_rslora: bool = False,
    init: str = "default",
    loraplus_lr_ratio: float | None = None,
    eva_rho: float = 2.0,
    eva_tau: float = 0.99,
    init_batches: int = 8,
) -> PeftModel:
    """Freeze the base and add rank-`r` LoRA adapters on `target_modules` (null or "all-linear": every linear
    map of the decoder blocks but routers) and on the 3-D expert `target_parameters` (null: the fused experts
    when the modules are the default), as the variant keys ask (DoRA, rsLoRA, `init`, LoRA+)."""
    if is_quantized(model):  # QLoRA: norms and the output layer in float32, inputs that carry gradients
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    targets = resolve_targets(target_modules, context.model_cfg, model)
    parameters = resolve_parameters(target_parameters, target_modules, context.model_cfg, model)
    check_init(init, model, parameters)
    config = lora_config(
        model,
        targets,
        r,
        alpha,
        dropout,
        parameters,
        **variant_options(use_dora, use_rslora, init, eva_rho, eva_tau),
    )
    asked = [f"method.{key}=true" for key, on in (("use_dora", use_dora), ("use_rslora", use_rslora)) if on]
    asked += [f"method.init={init}"] if init != "default" else []
    adapted = adapted_model(model, config, ", ".join(asked) or "method=lora")
    warn_if_converted(adapted, targets)
    if init == "eva":
        eva_initialised(adapted, list(training_batches(adapted, context, init_batches, "method.init=eva")))
    elif init == "loftq":
        loftq_initialised(adapted)
    elif str(init).startswith(RESIDUAL_INITS):
        keep_initial_adapter(adapted)
    set_lr_ratio(adapted, loraplus_lr_ratio)
    return with_module_dropout(adapted, dropout) if parameters and dropout else adapted


def warn_if_converted(model: PeftModel, targets: list[str]) -> None:
    """Warn, naming them, when peft moved target modules into target parameters: its mapping for adapters
    trained on transformers 4 checkpoints renames `gate_proj`/`up_proj`/`down_proj` to the fused experts'
    `gate_up_proj`/`down_proj` for some mixtures (DeepSeek-V3), and then dense modules of those names
    (a shared expert, a dense layer's MLP) are not adapted."""
    config = model.peft_config[model.active_adapter]
    dropped = sorted(set(targets) - set(config.target_modules or ()))
    if dropped:
        log.warning(
            "peft turned the LoRA targets %s into target_parameters %s (its transformers 4 compatibility "
            "mapping for adapters trained on transformers 4): the modules of those names outside the fused "
            "experts are not adapted",
            dropped,
            sorted(config.target_parameters or ()),
        )
