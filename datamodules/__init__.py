"""The tasks' DataModules (one per task, sharing `base.TextDataModule`); `build` makes the one a config
names."""

from __future__ import annotations

from typing import TYPE_CHECKING

from hydra.utils import instantiate
from omegaconf import DictConfig

IGNORE_INDEX = -100  # the label the loss skips (prompt tokens, padding)

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from datamodules.base import TextDataModule


def build(cfg: DictConfig, tokenizer: PreTrainedTokenizerBase) -> TextDataModule:
    """The DataModule of `cfg.task` with the run's data settings (`cfg.data`) and, in evaluate.py, its prompt
    style (`cfg.prompting.style`)."""
    style = {"prompt_style": cfg.prompting.style} if "prompting" in cfg else {}
    return instantiate(cfg.task.datamodule, tokenizer=tokenizer, **cfg.data, **style)
