"""Methods turn a built model into the trainable model.

A method is a module `lightning_modules/methods/<name>.py` holding a plain function `apply(model, context,
**knobs) -> model` and `SUPPORTS`, the task modules (lightning_modules/task_modules.py) it can train; a method
that needs a module of its own names it in `MODULE`. Its config (conf/method/<name>.yaml) targets `apply` with
`_partial_: true` and lists the knobs; its `name` is the module's name. `context` carries what a method may
need beyond the model (the model config, the tokenizer, the task's data, the run dir) and takes back the
numbers it reports (`metrics`). What a method trained is saved and restored by runtime/saved_run.py, which
finds the method again by its name only."""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from transformers import PreTrainedModel, PreTrainedTokenizerBase

# keys of a method config or method.json that describe it rather than being knobs of its `apply` (supports,
# module, apply: what the method.json of runs saved before methods declared these themselves holds)
DESCRIPTION_KEYS = ("name", "head", "supports", "module", "apply")
# a trained model's learning-rate ratios: {parameter-name part: ratio}, set by a method (LoRA+ on lora_B) and
# read by the optimiser (lightning_modules/base.py)
LR_RATIO_ATTR = "lmlab_lr_ratios"
# a trained model's TrainingHooks, set by a method that acts during training (AdaLoRA's rank budget)
TRAINING_HOOKS_ATTR = "lmlab_training_hooks"


class UnknownMethodError(ValueError):
    """A config or checkpoint names a method that is not a module of lightning_modules/methods."""


@dataclass
class MethodContext:
    """What a method may use besides the model (its model config, tokenizer, the task's DataModule, the run
    dir), and the metrics it reports back (train.py logs them at step 0)."""

    model_cfg: DictConfig | None = None
    tokenizer: PreTrainedTokenizerBase | None = None
    datamodule: Any = None
    run_dir: Path | None = None
    metrics: dict[str, float] = field(default_factory=dict)


class TrainingHooks:
    """What a method does while its model trains, called by the task module: at fit start with the total
    number of optimiser steps, for a term added to each training loss, after every optimiser step (gradients
    still there), at fit end to write into its run dir; its state travels in the training checkpoint, so a
    resumed run continues it exactly."""

    def on_fit_start(self, total_steps: int) -> None:
        """Training is about to take `total_steps` optimiser steps."""

    def regulariser(self) -> torch.Tensor | None:
        """A term the method adds to every training loss (None: none)."""
        return None

    def after_optimizer_step(self, step: int) -> None:
        """Optimiser step `step` (0-based) was taken; its gradients are not yet freed."""

    def on_fit_end(self) -> None:
        """Training ended (on rank 0): write what the method reports into the run dir it was applied in."""

    def state_dict(self) -> dict[str, Any]:
        """What a resumed run needs to continue (tensors, numbers, lists)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from `state_dict()` of an interrupted run."""


def training_hooks(model: torch.nn.Module) -> TrainingHooks:
    """The TrainingHooks a method left on `model` (none: hooks that do nothing)."""
    return getattr(model, TRAINING_HOOKS_ATTR, None) or TrainingHooks()


def count_parameters(model: torch.nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return trainable, total


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The trainable parameters by name, detached and contiguous (what a frozen-base method saves)."""
    return {name: p.detach().contiguous() for name, p in model.named_parameters() if p.requires_grad}


def names() -> list[str]:
    """Every method there is: the modules of this package."""
    return sorted(module.name for module in pkgutil.iter_modules(__path__))


def method_module(name: Any, where: str) -> ModuleType:
    """The method module called `name`; UnknownMethodError naming `where` (the config key or file) when this
    package has none (nothing outside it can be selected)."""
    if name not in names():
        raise UnknownMethodError(f"{where}: {name!r} is not a registered lmlab method; one of {names()}")
    return importlib.import_module(f"{__name__}.{name}")


def task_module(method_cfg: DictConfig) -> str | None:
    """The task module the method of `method_cfg` trains with when it brings its own (`MODULE`), else None."""
    return getattr(method_module(method_cfg.name, "method.name"), "MODULE", None)


def supports(method_cfg: DictConfig) -> tuple[str, ...]:
    """The task modules the method of `method_cfg` can train (its `SUPPORTS`)."""
    return tuple(method_module(method_cfg.name, "method.name").SUPPORTS)


def knobs(method_cfg: DictConfig | dict[str, Any]) -> dict[str, Any]:
    """The keyword arguments a method config passes to its `apply`."""
    config = method_cfg if isinstance(method_cfg, dict) else OmegaConf.to_container(method_cfg, resolve=True)
    return {k: v for k, v in config.items() if k not in DESCRIPTION_KEYS and not k.startswith("_")}


def build(method_cfg: DictConfig) -> Callable[[PreTrainedModel, MethodContext], PreTrainedModel]:
    """`apply(model, context)` of `method_cfg`: its `_target_` with the config's knobs bound; the target must
    be the `apply` of the method module the config is named after."""
    module = method_module(method_cfg.get("name"), "method.name")
    expected = f"{module.__name__}.apply"
    if method_cfg.get("_target_") != expected:
        raise UnknownMethodError(
            f"method.name={method_cfg.name} is {expected}, "
            f"but method._target_ is {method_cfg.get('_target_')!r}"
        )
    return instantiate({"_target_": expected, "_partial_": True, **knobs(method_cfg)})


def restore(name: Any, where: str) -> Callable[..., PreTrainedModel]:
    """The `apply` of the method a saved run names (by its name only: nothing else in a file selects code)."""
    return method_module(name, where).apply
