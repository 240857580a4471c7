"""The LightningModules a config may name (`task.module`, a method's `MODULE`), and which one a run uses."""

from __future__ import annotations

import lightning as L
from omegaconf import DictConfig

from lightning_modules import methods
from lightning_modules.causal_lm import CausalLMModule
from lightning_modules.classifier import ClassifierModule
from lightning_modules.dpo import DPOModule
from lightning_modules.grpo import GRPOModule
from lightning_modules.label_lm import LabelLMModule

TASK_MODULES: dict[str, type[L.LightningModule]] = {
    "causal_lm": CausalLMModule,
    "label_lm": LabelLMModule,
    "classifier": ClassifierModule,
    "grpo": GRPOModule,
    "dpo": DPOModule,
}


def task_module_name(cfg: DictConfig) -> str:
    """The name of the LightningModule a run trains with: the objective's when it is not supervised
    (`objective.module`: grpo, dpo), else the method's own module when it brings one, else the task's."""
    return (cfg.get("objective") or {}).get("module") or methods.task_module(cfg.method) or cfg.task.module


def task_module_class(name: str) -> type[L.LightningModule]:
    """The LightningModule class registered as `name` (task.module / a method's MODULE)."""
    if name not in TASK_MODULES:
        raise ValueError(
            f"task module '{name}' is not registered (task.module / a method's MODULE); known: "
            f"{sorted(TASK_MODULES)}"
        )
    return TASK_MODULES[name]
