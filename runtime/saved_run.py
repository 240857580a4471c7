"""A saved run: what train.py writes to `<run dir>/final/` and how `ckpt=` reads it back, in one place.

A saved run is one of three layouts, by what training changed:
- a peft adapter (`adapter_config.json` + `adapter_model.safetensors`): LoRA, svd_lora, prompt tuning;
- a whole model (`config.json` + `model.safetensors`, save_pretrained): full fine-tuning;
- a frozen-base method's trainable weights (`trainable.safetensors`) and its config (`method.json`),
  re-applied by its name on load (adapters, the projection head's backbone);
with, in every layout, `base_model.json` (the base model's identity and model config), the tokenizer, and for
a projection-head classifier its head (`classifier_head.safetensors` + `classifier.json`). An FSDP run's
weights are gathered first, so its final/ is a single-device run's.

Reading: `checkpoint_dir` resolves `ckpt=`, `checkpoint_model` picks the model config it was trained on,
`load_model` builds that base, checks it is the base the run was trained on, and restores the method;
`load_classifier` restores the head.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.strategies import FSDPStrategy
from omegaconf import DictConfig, OmegaConf, open_dict
from peft import PeftModel
from safetensors.torch import load_file, save_file
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from lightning_modules import methods
from lightning_modules.classifier import ClassifierModule
from lightning_modules.methods import MethodContext, count_parameters, trainable_state
from modeling import model_checks, models
from runtime.session import overrides

log = logging.getLogger(__name__)

ADAPTER_CONFIG = "adapter_config.json"
MODEL_CONFIG = "config.json"
TRAINABLE_FILE = "trainable.safetensors"
METHOD_FILE = "method.json"
BASE_MODEL_FILE = "base_model.json"
HEAD_FILE = "classifier_head.safetensors"
HEAD_CONFIG = "classifier.json"


def write_final(
    trainer: L.Trainer,
    module: L.LightningModule,
    method_cfg: DictConfig,
    tokenizer: PreTrainedTokenizerBase,
    target: Path,
    unsharded: Callable[[], L.LightningModule],
) -> str | None:
    """Save the trained run to `target` on rank 0 and return its path (None on other ranks). Under FSDP every
    rank takes part in gathering the weights; rank 0 loads them into `unsharded()` (the same model and method,
    built anew on one device) and saves that."""
    if isinstance(trainer.strategy, FSDPStrategy):
        state = trainer.strategy.full_state_dict()
        if not trainer.is_global_zero:
            return None
        module = unsharded()
        module.load_state_dict(state)
    elif not trainer.is_global_zero:
        return None
    write(module, method_cfg, tokenizer, target)
    return str(target)


def write(
    module: L.LightningModule, method_cfg: DictConfig, tokenizer: PreTrainedTokenizerBase, target: Path
) -> None:
    """Save what training changed in `module` (its model as its method saves it, and a classifier's head) and
    the tokenizer to `target`."""
    write_model(module.model, method_cfg, target)
    if isinstance(module, ClassifierModule):
        head = {
            name: p.detach().contiguous()
            for name, p in module.classifier.named_parameters()
            if not name.startswith("model.")
        }
        save_file(head, target / HEAD_FILE)
        (target / HEAD_CONFIG).write_text(json.dumps(module.head_config, indent=2) + "\n")
    tokenizer.save_pretrained(target)


def write_model(model: PreTrainedModel, method_cfg: DictConfig, target: Path) -> None:
    """Save what training changed in `model`: a peft adapter, the whole model (every weight trained), or the
    trainable weights and the method's config; and the identity of its base model."""
    target.mkdir(parents=True, exist_ok=True)
    identity = getattr(model, model_checks.BASE_IDENTITY_ATTR, None)
    if identity is not None:
        (target / BASE_MODEL_FILE).write_text(json.dumps(identity, indent=2) + "\n")
    trainable, total = count_parameters(model)
    if isinstance(model, PeftModel) or trainable == total:
        model.save_pretrained(target, safe_serialization=True)
        return
    state = trainable_state(model)
    if state:
        save_file(state, target / TRAINABLE_FILE)
    (target / METHOD_FILE).write_text(
        json.dumps(OmegaConf.to_container(method_cfg, resolve=True), indent=2) + "\n"
    )


def checkpoint_dir(cfg: DictConfig) -> Path | None:
    """The directory `cfg.ckpt` names (a run dir's final/ when given a run dir), or None for the base
    model."""
    if not cfg.get("ckpt"):
        return None
    directory = Path(cfg.ckpt)
    return directory / "final" if (directory / "final").is_dir() else directory


def use_checkpoint_model(cfg: DictConfig) -> None:
    """Set `cfg.model` to the model a `ckpt=` export was trained on when the command line chose no
    `model=`."""
    with open_dict(cfg):
        cfg.model = checkpoint_model(cfg)


def checkpoint_model(cfg: DictConfig) -> DictConfig:
    """The model config to evaluate or analyse: the one a `ckpt=` export was trained on when the command line
    chose no `model=` (its base_model.json), else `cfg.model`."""
    directory = checkpoint_dir(cfg)
    saved = _saved_identity(directory) if directory is not None else None
    chosen = any(o.lstrip("+~").startswith("model") for o in overrides())
    if saved is None or chosen or "config" not in saved:
        return cfg.model
    log.info(
        "ckpt=%s was trained on model '%s': evaluating that model (pass model=... to choose another)",
        cfg.ckpt,
        saved["name"],
    )
    return OmegaConf.create(saved["config"])


def load_model(cfg: DictConfig) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """The base model of `cfg.model`, or the fine-tuned one that `cfg.ckpt` points to (refused when it was
    trained on another base model, unless allow_base_mismatch)."""
    directory = checkpoint_dir(cfg)
    if directory is None:
        return models.build(cfg.model, cache_dir=cfg.paths.cache_dir)
    if (directory / ADAPTER_CONFIG).exists() or (directory / METHOD_FILE).exists():
        base, tokenizer = models.build(cfg.model, cache_dir=cfg.paths.cache_dir)
        model_checks.check_same_base(
            _saved_identity(directory),
            model_checks.base_identity(base, cfg.model),
            f"ckpt={cfg.ckpt}",
            bool(cfg.get("allow_base_mismatch")),
        )
        if (directory / "tokenizer_config.json").exists():
            tokenizer = _run_tokenizer(cfg, directory)
        if (directory / ADAPTER_CONFIG).exists():
            return _load_adapter(base, directory), tokenizer
        return restore_method(base, directory, cfg.model), tokenizer
    if (directory / MODEL_CONFIG).exists():
        model_cfg = cfg.model.copy()
        with open_dict(model_cfg):
            # architecture comes from the saved config.json, whatever model= claims
            model_cfg.path = str(directory)
            model_cfg.family = "custom"
        return models.build(model_cfg)
    raise FileNotFoundError(
        f"ckpt={cfg.ckpt}: expected a train.py run dir (with final/), a peft adapter dir ({ADAPTER_CONFIG}), "
        f"a frozen-base method dir ({METHOD_FILE}) or a save_pretrained dir ({MODEL_CONFIG})"
    )


def load_tokenizer(cfg: DictConfig) -> PreTrainedTokenizerBase:
    """The tokenizer `load_model(cfg)` returns, without loading any weights."""
    directory = checkpoint_dir(cfg)
    if directory is not None and (directory / "tokenizer_config.json").exists():
        return _run_tokenizer(cfg, directory)
    return models.load_tokenizer(cfg.model, cache_dir=cfg.paths.cache_dir)


def _run_tokenizer(cfg: DictConfig, directory: Path) -> PreTrainedTokenizerBase:
    """The tokenizer a run saved beside its weights in `directory`, loaded by the model config's rules."""
    return models.load_tokenizer(OmegaConf.merge(cfg.model, {"path": str(directory)}))


def restore_method(base: PreTrainedModel, directory: Path, model_cfg: DictConfig) -> PreTrainedModel:
    """Re-apply the method saved in `directory` (method.json, by its name only) to `base` and load its
    trained weights."""
    saved = json.loads((directory / METHOD_FILE).read_text())
    apply = methods.restore(saved.get("name"), str(directory / METHOD_FILE))
    model = apply(base, MethodContext(model_cfg=model_cfg), **methods.knobs(saved))
    if (directory / TRAINABLE_FILE).exists():
        state = read_safetensors(directory / TRAINABLE_FILE)
        expected = set(trainable_state(model))
        if set(state) != expected:
            raise ValueError(
                f"{directory / TRAINABLE_FILE}: saved weights do not match method '{saved['name']}' on this "
                f"model (missing {sorted(expected - set(state))[:3]}, unexpected "
                f"{sorted(set(state) - expected)[:3]})"
            )
        model.load_state_dict(state, strict=False)
    return model


def load_classifier(model: PreTrainedModel, cfg: DictConfig) -> ClassifierModule | None:
    """The projection-head classifier `cfg.ckpt` saved, on its (restored) backbone `model`; None when the
    saved run has no head."""
    directory = checkpoint_dir(cfg)
    if directory is None or not (directory / HEAD_CONFIG).exists():
        return None
    module = ClassifierModule(model, **json.loads((directory / HEAD_CONFIG).read_text()))
    missing, unexpected = module.classifier.load_state_dict(
        read_safetensors(directory / HEAD_FILE), strict=False
    )
    missing = [name for name in missing if not name.startswith("model.")]
    if missing or unexpected:
        raise ValueError(
            f"{directory / HEAD_FILE}: does not match {HEAD_CONFIG} (missing {missing}, "
            f"unexpected {unexpected})"
        )
    return module


def read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file; a corrupt or truncated file raises ValueError naming it."""
    try:
        return load_file(path)
    except Exception as error:  # safetensors raises SafetensorError / OSError for damaged files
        raise ValueError(
            f"{path}: not a readable safetensors file, truncated or corrupt ({error}); re-export it"
        ) from error


def _saved_identity(directory: Path) -> dict[str, Any] | None:
    path = directory / BASE_MODEL_FILE
    return json.loads(path.read_text()) if path.exists() else None


def _load_adapter(base: PreTrainedModel, directory: Path) -> PeftModel:
    """A peft adapter on `base`; a corrupt adapter file raises ValueError naming it."""
    try:
        return PeftModel.from_pretrained(base, directory)
    except Exception:
        weights = directory / "adapter_model.safetensors"
        if weights.exists():
            read_safetensors(weights)  # raises the error that names a damaged file
        raise
