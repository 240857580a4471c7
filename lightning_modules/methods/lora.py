"""LoRA through peft. Target modules default to the model config's `lora_target_modules` (its family's)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from omegaconf import DictConfig
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import PreTrainedModel

from lightning_modules import architecture
from lightning_modules.methods import MethodContext


def resolve_targets(targets: Sequence[str] | None, model_cfg: DictConfig) -> list[str]:
    """The method's explicit `targets`, else the architecture family's default from the model config."""
    targets = targets or model_cfg.get("lora_target_modules")
    if not targets:
        raise ValueError(
            f"method.target_modules is empty and model '{model_cfg.name}' sets no lora_target_modules; "
            "pass method.target_modules=[q_proj,v_proj] (module names of the model)"
        )
    return [str(name) for name in targets]


def lora_config(model: PreTrainedModel, targets: list[str], r: int, alpha: float, dropout: float, **extra: Any) -> LoraConfig:
    """The peft LoraConfig (rank `r`, scaling `alpha / r`) on `targets` of `model` (Conv1D layout from its family)."""
    return LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=targets, bias="none",
                      task_type="CAUSAL_LM", fan_in_fan_out=architecture.of(model).conv1d, **extra)


def apply(model: PreTrainedModel, context: MethodContext, r: int = 8, alpha: float = 16, dropout: float = 0.05,
          target_modules: Sequence[str] | None = None) -> PeftModel:
    """Freeze the base and add rank-`r` LoRA adapters on `target_modules` (null: the model family's defaults)."""
    return get_peft_model(model, lora_config(model, resolve_targets(target_modules, context.model_cfg), r, alpha, dropout))
