"""Loading what train.py exported (`ckpt=`): the directory it names, the base model it was trained on, and
the model with its method restored (a peft adapter, a frozen-base method's weights, or a whole saved model)."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf, open_dict
from peft import PeftModel
from transformers import AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from lightning_modules import methods, models
from lightning_modules.registry import restore_method
from runtime.session import overrides

log = logging.getLogger(__name__)


def checkpoint_dir(cfg: DictConfig) -> Path | None:
    """The directory `cfg.ckpt` names (a run dir's final/ when given a run dir), or None for the base model."""
    if not cfg.get("ckpt"):
        return None
    directory = Path(cfg.ckpt)
    return directory / "final" if (directory / "final").is_dir() else directory


def use_checkpoint_model(cfg: DictConfig) -> None:
    """Set `cfg.model` to the model a `ckpt=` export was trained on when the command line chose no `model=`."""
    with open_dict(cfg):
        cfg.model = checkpoint_model(cfg)


def checkpoint_model(cfg: DictConfig) -> DictConfig:
    """The model config to evaluate or analyse: the one a `ckpt=` export was trained on when the command line chose
    no `model=` (its base_model.json), else `cfg.model`."""
    directory = checkpoint_dir(cfg)
    saved = _saved_identity(directory) if directory is not None else None
    chosen = any(o.lstrip("+~").startswith("model") for o in overrides())
    if saved is None or chosen or "config" not in saved:
        return cfg.model
    log.info("ckpt=%s was trained on model '%s': evaluating that model (pass model=... to choose another)", cfg.ckpt, saved["name"])
    return OmegaConf.create(saved["config"])


def load_model(cfg: DictConfig) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """The base model of `cfg.model`, or the fine-tuned one that `cfg.ckpt` points to (refused when it was
    trained on another base model, unless allow_base_mismatch)."""
    directory = checkpoint_dir(cfg)
    if directory is None:
        return models.build(cfg.model, cache_dir=cfg.paths.cache_dir)
    if (directory / "adapter_config.json").exists() or (directory / methods.METHOD_FILE).exists():
        base, tokenizer = models.build(cfg.model, cache_dir=cfg.paths.cache_dir)
        models.check_same_base(_saved_identity(directory), models.base_identity(base, cfg.model), f"ckpt={cfg.ckpt}",
                               bool(cfg.get("allow_base_mismatch")))
        if (directory / "tokenizer_config.json").exists():
            tokenizer = AutoTokenizer.from_pretrained(directory)
        if (directory / "adapter_config.json").exists():
            return _load_adapter(base, directory), tokenizer
        return restore_method(base, directory, cfg.model), tokenizer
    if (directory / "config.json").exists():
        model_cfg = cfg.model.copy()
        with open_dict(model_cfg):
            model_cfg.path = str(directory)  # architecture comes from the saved config.json, whatever model= claims
            model_cfg.family = "custom"
        return models.build(model_cfg)
    raise FileNotFoundError(
        f"ckpt={cfg.ckpt}: expected a train.py run dir (with final/), a peft adapter dir (adapter_config.json), "
        f"a frozen-base method dir ({methods.METHOD_FILE}) or a save_pretrained dir (config.json)"
    )


def _saved_identity(directory: Path) -> dict[str, Any] | None:
    path = directory / methods.BASE_MODEL_FILE
    return json.loads(path.read_text()) if path.exists() else None


def _load_adapter(base: PreTrainedModel, directory: Path) -> PeftModel:
    """A peft adapter on `base`; a corrupt adapter file raises ValueError naming it."""
    try:
        return PeftModel.from_pretrained(base, directory)
    except Exception:
        weights = directory / "adapter_model.safetensors"
        if weights.exists():
            methods.read_safetensors(weights)  # raises the error that names a damaged file
        raise
