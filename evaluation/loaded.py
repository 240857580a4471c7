"""What one evaluation process scores with, loaded from the run's `RunModel` (runtime/saved_run.py) on that
process's device: the model, its tokenizer and a saved projection head. evaluate.py and each data-parallel
process (evaluation/data_parallel.py) load it the same way."""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
from omegaconf import DictConfig
from transformers import PreTrainedTokenizerBase

from evaluation import vllm_backend
from modeling.classifier_head import SequenceClassifier
from runtime import saved_run
from runtime.saved_run import RunModel
from runtime.validate import uses_cuda


class Loaded(NamedTuple):
    """The model (None when a vLLM engine loads the weights), its tokenizer, the projection head a run saved
    (None: classify by label likelihood) with the class names it was trained on, and the `RunModel` they came
    from."""

    model: Any
    tokenizer: PreTrainedTokenizerBase
    head: SequenceClassifier | None
    choice: RunModel
    head_classes: list[str] | None = None


def load(choice: RunModel, cfg: DictConfig, rank: int = 0) -> Loaded:
    """`choice` loaded for process `rank` in eval mode, on its device (`accelerator`; a model that
    `model.device_map` spreads over devices stays put)."""
    if vllm_backend.backend(cfg) == "vllm":  # the engine loads the weights
        return Loaded(None, saved_run.load_tokenizer(choice, cfg.paths.cache_dir), None, choice)
    model, tokenizer = saved_run.load(choice, cfg.paths.cache_dir)
    sharded = cfg.model.get("device_map") is not None
    if not sharded:
        model = model.to(device_for(cfg, rank))
    saved = saved_run.load_head(model, choice)
    if saved is None:
        return Loaded(model.eval(), tokenizer, None, choice)
    head, classes = saved
    head = head if sharded else head.to(model.device)
    return Loaded(model.eval(), tokenizer, head.eval(), choice, classes)


def device_for(cfg: DictConfig, rank: int) -> torch.device:
    """The device of process `rank`: `accelerator` cpu, cuda, or auto (cuda when one is visible; checked with
    the run's config: runtime/validate.py)."""
    return torch.device("cuda", rank) if uses_cuda(cfg) else torch.device("cpu")
