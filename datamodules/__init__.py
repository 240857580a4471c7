"""Tasks (datamodules/task.py: one class per task, without Lightning) and the DataModule that batches a task
for train.py (datamodules/base.py); `build_task` makes the task a config names, `build` its DataModule."""

from __future__ import annotations

from typing import TYPE_CHECKING

from hydra.utils import instantiate
from omegaconf import DictConfig

IGNORE_INDEX = -100  # the label the loss skips (prompt tokens, padding)
# the `data` keys that batch a task's examples (the DataModule's); the others are the task's own
BATCHING_KEYS = ("batch_size", "eval_batch_size", "num_workers", "group_by_length")

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from datamodules.base import TextDataModule
    from datamodules.task import Task


def build_task(cfg: DictConfig, tokenizer: PreTrainedTokenizerBase) -> Task:
    """The task of `cfg.task` (its `definition`) with the run's data settings and, in evaluate.py, its prompt
    style (`cfg.prompting.style`)."""
    if "datamodule" in cfg.task:
        raise ValueError(
            f"task '{cfg.task.name}': task.datamodule is now task.definition (the task class and its "
            "settings; the DataModule that batches it is built from `data`)"
        )
    style = {"prompt_style": cfg.prompting.style} if "prompting" in cfg else {}
    settings = {key: value for key, value in cfg.data.items() if key not in BATCHING_KEYS}
    return instantiate(cfg.task.definition, tokenizer=tokenizer, **settings, **style)


def build(cfg: DictConfig, tokenizer: PreTrainedTokenizerBase) -> TextDataModule:
    """The DataModule that batches `build_task(cfg, tokenizer)` with the run's `data` batching keys."""
    from datamodules.base import TextDataModule

    batching = {key: cfg.data[key] for key in BATCHING_KEYS if key in cfg.data}
    return TextDataModule(build_task(cfg, tokenizer), **batching)
