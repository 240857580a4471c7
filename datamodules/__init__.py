"""Tasks (datamodules/task.py: one class per task, without Lightning) and the DataModule that batches a task
for train.py (datamodules/base.py); `build_task` makes the task a config names, `build` its DataModule."""

from __future__ import annotations

from typing import TYPE_CHECKING

from hydra.utils import get_class, instantiate
from omegaconf import DictConfig, OmegaConf

IGNORE_INDEX = -100  # the label the loss skips (prompt tokens, padding)
# the `data` keys that batch a task's examples (the DataModule's); the others are the task's own
BATCHING_KEYS = ("batch_size", "eval_batch_size", "num_workers", "group_by_length")

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from datamodules.base import TextDataModule
    from datamodules.task import Task


def build_task(cfg: DictConfig, tokenizer: PreTrainedTokenizerBase) -> Task:
    """The task of `cfg.task` (its `definition`) with the run's data settings and its prompt settings
    (`cfg.prompt`: style, chat template; plain-text prompts of lmlab's style where the config has none)."""
    from datamodules import chat

    if "datamodule" in cfg.task:
        raise ValueError(
            f"task '{cfg.task.name}': task.datamodule is now task.definition (the task class and its "
            "settings; the DataModule that batches it is built from `data`)"
        )
    if cfg.get("prompting") is not None:
        raise ValueError("prompting.* is now prompt.* (conf/prompt/default.yaml): e.g. prompt.num_fewshot=5")
    prompt = OmegaConf.to_container(cfg.prompt, resolve=True) if cfg.get("prompt") else {}
    style = chat.style_for(prompt, bool(cfg.model.get("chat")), tokenizer)
    if style is not None and not get_class(cfg.task.definition._target_).renders_chat:
        if prompt["chat_template"] is True:
            raise ValueError(f"prompt.chat_template=true: task '{cfg.task.name}' prompts in plain text only")
        style = None
    settings = {key: value for key, value in cfg.data.items() if key not in BATCHING_KEYS}
    # partial: the chat style is passed as the object it is, not converted to config
    task = instantiate(cfg.task.definition, _partial_=True)
    return task(tokenizer=tokenizer, **settings, prompt_style=prompt.get("style", "lmlab"), chat_style=style)


def build(cfg: DictConfig, tokenizer: PreTrainedTokenizerBase) -> TextDataModule:
    """The DataModule that batches `build_task(cfg, tokenizer)` with the run's `data` batching keys: the
    objective's (`objective.datamodule`: prompts for GRPO, pairs for DPO), else supervised examples."""
    batching = {key: cfg.data[key] for key in BATCHING_KEYS if key in cfg.data}
    target = (cfg.get("objective") or {}).get("datamodule") or {"_target_": "datamodules.base.TextDataModule"}
    # partial: the task is passed as the object it is, not converted to config
    return instantiate(target, _partial_=True)(task=build_task(cfg, tokenizer), **batching)
