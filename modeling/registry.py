"""The names a config or a checkpoint may use, and the code each one means: task modules, methods and
evaluation scorers.

`task.module` (and a method's `module`) name a LightningModule class in `TASK_MODULES`; `method.name` names an
`apply` function in `METHODS`. A method config targets its function itself (`_target_`, `_partial_: true`, the
knobs as keyword arguments), so a reader follows it from YAML to code; `build_method` checks that the target
is the registered function of that name. A checkpoint's method.json is resolved by its registry name only:
nothing else in a checkpoint can select code to run. A DataModule's `evaluation_kind` names the scorer
evaluate.py runs in `SCORERS`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import lightning as L
from hydra.utils import get_method, instantiate
from omegaconf import DictConfig, OmegaConf
from transformers import PreTrainedModel

from modeling.causal_lm import CausalLMModule
from modeling.classifier import ClassifierModule
from modeling.label_lm import LabelLMModule
from modeling.methods import (
    MethodContext,
    adapter,
    full,
    lora,
    projection_head,
    prompt_tuning,
    svd_lora,
)

TASK_MODULES: dict[str, type[L.LightningModule]] = {
    "causal_lm": CausalLMModule,
    "label_lm": LabelLMModule,
    "classifier": ClassifierModule,
}
METHODS: dict[str, Callable[..., PreTrainedModel]] = {
    "full": full.apply,
    "lora": lora.apply,
    "svd_lora": svd_lora.apply,
    "prompt_tuning": prompt_tuning.apply,
    "adapter": adapter.apply,
    "projection_head": projection_head.apply,
}
# DataModule.evaluation_kind -> the function evaluate.py scores with, score(cfg, model, tokenizer,
# datamodule, records, run_dir) -> (rows, metrics, intervals); by dotted path, since the scorers live in the
# runtime layer above this one
SCORERS: dict[str, str] = {
    "generation": "runtime.generation_scoring.score",
    "classification": "runtime.classification_scoring.score",
}
# keys of a method config that describe it rather than being knobs of its function (`apply`: the dotted path
# that exports before the registry recorded, ignored)
DESCRIPTION_KEYS = ("name", "supports", "module", "head", "apply")


class UnknownMethodError(ValueError):
    """A config or checkpoint names a method that is not in METHODS."""


def task_module_name(cfg: DictConfig) -> str:
    """The name of the LightningModule a run trains with: the method's `module` when it sets one, else the
    task's."""
    return cfg.method.get("module") or cfg.task.module


def scorer(kind: str) -> Callable[..., tuple[list[dict[str, Any]], dict[str, float], dict[str, Any]]]:
    """The scoring function registered for a DataModule's `evaluation_kind`."""
    if kind not in SCORERS:
        raise ValueError(f"evaluation_kind={kind!r} has no scorer; known: {sorted(SCORERS)}")
    return get_method(SCORERS[kind])


def task_module_class(name: str) -> type[L.LightningModule]:
    """The LightningModule class registered as `name` (task.module / method.module)."""
    if name not in TASK_MODULES:
        raise ValueError(
            f"task module '{name}' is not registered (task.module / method.module); known: "
            f"{sorted(TASK_MODULES)}"
        )
    return TASK_MODULES[name]


def method_knobs(method_cfg: DictConfig | dict[str, Any]) -> dict[str, Any]:
    """The keyword arguments a method config passes to its function."""
    config = method_cfg if isinstance(method_cfg, dict) else OmegaConf.to_container(method_cfg, resolve=True)
    return {k: v for k, v in config.items() if k not in DESCRIPTION_KEYS and not k.startswith("_")}


def build_method(method_cfg: DictConfig) -> Callable[[PreTrainedModel, MethodContext], PreTrainedModel]:
    """`apply(model, context)` of `method_cfg`: its `_target_` with the config's knobs bound."""
    registered = registered_method(method_cfg.get("name"), "method.name")
    target = method_cfg.get("_target_")
    if target != f"{registered.__module__}.{registered.__name__}":
        raise UnknownMethodError(
            f"method.name={method_cfg.name} is {registered.__module__}.{registered.__name__}, "
            f"but method._target_ is {target!r}"
        )
    return instantiate({"_target_": target, "_partial_": True, **method_knobs(method_cfg)})


def registered_method(name: Any, where: str) -> Callable[..., PreTrainedModel]:
    """The method function registered as `name`; UnknownMethodError naming `where` (the config key or file)
    when there is none."""
    if name not in METHODS:
        raise UnknownMethodError(
            f"{where}: {name!r} is not a registered lmlab method; one of {sorted(METHODS)}"
        )
    return METHODS[name]
