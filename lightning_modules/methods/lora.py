"""LoRA through peft. Target modules default to the model config's `lora_target_modules`."""

from __future__ import annotations

from typing import Any

from omegaconf import DictConfig
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import PreTrainedModel

from lightning_modules.methods import MethodContext


def target_modules(cfg: DictConfig, model_cfg: DictConfig) -> list[str]:
    """The method's explicit `target_modules`, else the architecture family's default from the model config."""
    targets = cfg.get("target_modules") or model_cfg.get("lora_target_modules")
    if not targets:
        raise ValueError(
            f"method.target_modules is empty and model '{model_cfg.name}' sets no lora_target_modules; "
            "pass method.target_modules=[q_proj,v_proj] (module names of the model)"
        )
    return [str(name) for name in targets]


def lora_config(cfg: DictConfig, model_cfg: DictConfig, **overrides: Any) -> LoraConfig:
    """The peft LoraConfig of `cfg` (rank `r`, scaling `alpha / r`) on the model's target modules."""
    settings = {
        "r": cfg.r,
        "lora_alpha": cfg.alpha,
        "lora_dropout": cfg.dropout,
        "target_modules": target_modules(cfg, model_cfg),
        "bias": "none",
        "task_type": "CAUSAL_LM",
        "fan_in_fan_out": bool(model_cfg.get("conv1d_weights")),
    }
    return LoraConfig(**(settings | overrides))


def apply(model: PreTrainedModel, cfg: DictConfig, model_cfg: DictConfig, context: MethodContext | None = None) -> PeftModel:
    """Freeze the base and add LoRA adapters on the target modules."""
    return get_peft_model(model, lora_config(cfg, model_cfg))
