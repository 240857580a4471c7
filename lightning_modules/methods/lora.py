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

import itertools
import logging
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
from torch import nn
from transformers import PreTrainedModel

from lightning_modules.methods import LR_RATIO_ATTR, MethodContext
from modeling import architecture
from modeling.experts import fused_expert_parameters
from modeling.lora_init import (
    RESIDUAL_INITS,
    check_init,
    eva_initialised,
    keep_initial_adapter,
    loftq_initialised,
    variant_options,
)
from modeling.lora_targets import block_linear_targets
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


def variant_keys(method: str, use_dora: bool, use_rslora: bool, init: str = "default") -> str:
    """The keys a run set to ask for its LoRA variants (what a refusal by peft names), else `method=...`."""
    asked = [f"method.{key}=true" for key, on in (("use_dora", use_dora), ("use_rslora", use_rslora)) if on]
    asked += [f"method.init={init}"] if init != "default" else []
    return ", ".join(asked) or f"method={method}"


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
    eva_label_mask: bool = True,
    eva_max_passes: int = 100,
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
        **variant_options(use_dora, use_rslora, init, eva_rho, eva_tau, eva_label_mask),
    )
    adapted = adapted_model(model, config, variant_keys("lora", use_dora, use_rslora, init))
    warn_if_converted(adapted, targets)
    if init == "eva":
        batches = list(training_batches(adapted, context, init_batches, "method.init=eva"))
        eva_initialised(adapted, batches, eva_max_passes)
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
