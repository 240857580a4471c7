"""LoRA through peft. Target modules default to every linear map of the decoder blocks (peft's
`all-linear`)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from omegaconf import DictConfig
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import PreTrainedModel

from lightning_modules.methods import MethodContext
from modeling import architecture

SUPPORTS = ("causal_lm", "label_lm")  # the task modules it can train

ALL_LINEAR = "all-linear"


def resolve_targets(
    targets: Sequence[str] | str | None, model_cfg: DictConfig | None, model: PreTrainedModel
) -> list[str]:
    """The module names (or name suffixes) LoRA adapts: the method's `targets`, else the model config's
    `lora_target_modules`, else (and for "all-linear") every linear map of `model`'s decoder blocks."""
    targets = (
        targets or (model_cfg.get("lora_target_modules") if model_cfg is not None else None) or ALL_LINEAR
    )
    if isinstance(targets, str):
        return block_linear_targets(model) if targets == ALL_LINEAR else [targets]
    return [str(name) for name in targets]


def block_linear_targets(model: PreTrainedModel) -> list[str]:
    """Target names that match exactly the linear maps of the decoder blocks: their last name components when
    those match nothing outside the blocks (`q_proj`, ...), else their paths within a block
    (`self_attn.q_proj`)."""
    paths = architecture.block_linear_names(model)
    short = sorted({path.rsplit(".", 1)[-1] for path in paths})
    blocks = architecture.structure(model).blocks
    outside = [
        name
        for name, _ in architecture.bare_model(model).named_modules()
        if name and not name.startswith(blocks + ".") and name.rsplit(".", 1)[-1] in short
    ]
    return sorted(paths) if outside else short


def lora_config(
    model: PreTrainedModel, targets: list[str], r: int, alpha: float, dropout: float, **extra: Any
) -> LoraConfig:
    """The peft LoraConfig (rank `r`, scaling `alpha / r`) on `targets` of `model` (Conv1D layout where it has
    one)."""
    return LoraConfig(
        r=r,
        lora_alpha=alpha,
        lora_dropout=dropout,
        target_modules=targets,
        bias="none",
        task_type="CAUSAL_LM",
        fan_in_fan_out=architecture.stores_transposed_linears(model),
        **extra,
    )


def apply(
    model: PreTrainedModel,
    context: MethodContext,
    r: int = 8,
    alpha: float = 16,
    dropout: float = 0.05,
    target_modules: Sequence[str] | str | None = None,
) -> PeftModel:
    """Freeze the base and add rank-`r` LoRA adapters on `target_modules` (null or "all-linear": every linear
    map of the decoder blocks)."""
    return get_peft_model(
        model,
        lora_config(model, resolve_targets(target_modules, context.model_cfg, model), r, alpha, dropout),
    )
