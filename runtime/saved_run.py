"""A saved run: what train.py writes to `<run dir>/final/` and how `ckpt=` reads it back, in one place.

A saved run is one of four layouts, by what training (or an edit) changed:
- a peft adapter (`adapter_config.json` + `adapter_model.safetensors`): LoRA (PiSSA / OLoRA as plain LoRA),
  svd_lora, AdaLoRA, VeRA, IA3, prompt tuning;
- a whole model (`config.json` + `model.safetensors`, save_pretrained): full fine-tuning;
- a frozen-base method's trainable weights (`trainable.safetensors`) and its config (`method.json`),
  re-applied by its name on load (adapters, the projection head's backbone);
- an edit of the base model's weights (`weight_deltas.safetensors`, added on load, and `edits.json`): a
  `python -m analysis.memit` run;
with, in every layout, `base_model.json` (the base model's identity and model config), the tokenizer, and what
the task module adds to the model (a projection head: modeling/classifier_head.py). An FSDP run's weights are
gathered first, so its final/ is a single-device run's.

Reading: `resolve` says once, at an entrypoint's start, which model a config with `ckpt=` loads (a `RunModel`:
base model config, export, layout); `load`, `load_tokenizer` and `load_head` read it."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.strategies import FSDPStrategy
from omegaconf import DictConfig, OmegaConf, open_dict
from peft import PeftModel
from safetensors.torch import save_file
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from lightning_modules import methods
from lightning_modules.methods import MethodContext, count_parameters, trainable_state
from modeling import classifier_head, model_checks, models
from modeling.classifier_head import SequenceClassifier
from modeling.lora_init import save_adapter
from modeling.model_checks import read_safetensors

log = logging.getLogger(__name__)

ADAPTER_CONFIG = "adapter_config.json"
MODEL_CONFIG = "config.json"
TRAINABLE_FILE = "trainable.safetensors"
METHOD_FILE = "method.json"
BASE_MODEL_FILE = "base_model.json"
DELTAS_FILE = "weight_deltas.safetensors"
EDITS_FILE = "edits.json"
# model.* keys that say how to load a model rather than which model it is: given on the command line, they
# apply on top of the model config a ckpt= run saved (conf/model/from_ckpt.yaml)
LOADING_KEYS = (
    "dtype",
    "device_map",
    "max_memory",
    "offload_folder",
    "attn_implementation",
    "trust_remote_code",
)
# conf/model/from_ckpt.yaml's marker: the command line named no model option
FROM_CKPT = "from_ckpt"


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
    """Save what training changed in `module` (its model as its method saves it, and what the module adds to
    it) and the tokenizer to `target`."""
    write_model(module.model, method_cfg, target)
    module.write_extras(target)
    tokenizer.save_pretrained(target)


def write_model(model: PreTrainedModel, method_cfg: DictConfig, target: Path) -> None:
    """Save what training changed in `model`: a peft adapter, the whole model (every weight trained), or the
    trainable weights and the method's config; and the identity of its base model."""
    target.mkdir(parents=True, exist_ok=True)
    identity = getattr(model, model_checks.BASE_IDENTITY_ATTR, None)
    if identity is not None:
        (target / BASE_MODEL_FILE).write_text(json.dumps(identity, indent=2) + "\n")
    trainable, total = count_parameters(model)
    if isinstance(model, PeftModel):  # a PiSSA / OLoRA adapter saved as a plain LoRA
        return save_adapter(model, target)
    if trainable == total:
        return model.save_pretrained(target, safe_serialization=True)
    state = trainable_state(model)
    if state:
        save_file(state, target / TRAINABLE_FILE)
    (target / METHOD_FILE).write_text(
        json.dumps(OmegaConf.to_container(method_cfg, resolve=True), indent=2) + "\n"
    )


def write_weight_deltas(
    deltas: dict[str, torch.Tensor], identity: dict[str, Any], edits: list[dict[str, Any]], target: Path
) -> None:
    """Save an edit of a base model: each changed weight's delta by parameter name, the base model's identity
    and the edits that made them."""
    target.mkdir(parents=True, exist_ok=True)
    save_file({name: delta.contiguous() for name, delta in deltas.items()}, target / DELTAS_FILE)
    (target / BASE_MODEL_FILE).write_text(json.dumps(identity, indent=2) + "\n")
    (target / EDITS_FILE).write_text(json.dumps(edits, indent=2) + "\n")


@dataclass(frozen=True)
class RunModel:
    """Which model an entrypoint loads, resolved once from `model` and `ckpt`: the base model's config, the
    export whose weights apply to it (None: the base model itself) and what that export holds."""

    config: DictConfig
    export: Path | None = None
    # base: no export; adapter: a peft adapter; method: a frozen-base method's weights; whole:
    # save_pretrained; edit: weight deltas on the base
    layout: str = "base"
    saved_identity: dict[str, Any] | None = None
    ckpt: str | None = None
    allow_base_mismatch: bool = False

    @property
    def has_tokenizer(self) -> bool:
        """The export saved its own tokenizer (train.py's runs do)."""
        return self.export is not None and (self.export / "tokenizer_config.json").exists()


def resolve(cfg: DictConfig) -> RunModel:
    """The model `cfg` asks for, and `cfg.model` set to its config (run names and results name it). With no
    model option named (model=from_ckpt, the default of evaluate.py and the analyses): a ckpt= export's saved
    base model with the LOADING_KEYS given on the command line on top, or without ckpt= the default model;
    with one named: that option (checked against the export's base when loaded)."""
    export = _export_dir(cfg)
    saved = _saved_identity(export) if export is not None else None
    config = cfg.model
    if config.get(FROM_CKPT):
        given = {key: config[key] for key in LOADING_KEYS if config.get(key) is not None}
        if saved is not None and "config" in saved:
            log.info("ckpt=%s was trained on model '%s': loading that model", cfg.ckpt, saved["name"])
            config = OmegaConf.merge(_current_keys(saved["config"]), given)
        else:
            config = OmegaConf.masked_copy(config, [key for key in config if key != FROM_CKPT])
    choice = RunModel(
        config, export, _layout(export, cfg), saved, cfg.get("ckpt"), bool(cfg.get("allow_base_mismatch"))
    )
    with open_dict(cfg):
        cfg.model = choice.config
    return choice


def load(choice: RunModel, cache_dir: str | None = None) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """The model `choice` names: its base; the base with the export's method restored (refused when the
    export was trained on another base model, unless allow_base_mismatch); or the exported whole model."""
    if choice.layout == "whole":
        # architecture comes from the saved config.json, whatever the model config claims
        return models.build(OmegaConf.merge(choice.config, {"path": str(choice.export), "family": "custom"}))
    base, tokenizer = models.build(choice.config, cache_dir=cache_dir)
    if choice.layout == "base":
        return base, tokenizer
    model_checks.check_same_base(
        choice.saved_identity,
        model_checks.base_identity(base, choice.config),
        f"ckpt={choice.ckpt}",
        choice.allow_base_mismatch,
    )
    if choice.has_tokenizer:
        tokenizer = load_tokenizer(choice, cache_dir)
    if choice.layout == "adapter":
        return _load_adapter(base, choice.export), tokenizer
    if choice.layout == "edit":
        return _add_deltas(base, choice.export / DELTAS_FILE), tokenizer
    return restore_method(base, choice.export, choice.config), tokenizer


def load_tokenizer(choice: RunModel, cache_dir: str | None = None) -> PreTrainedTokenizerBase:
    """The tokenizer `load(choice)` returns, without loading any weights: the export's own, else the base
    model's (by the model config's rules: pad-token fallback, trust_remote_code)."""
    if choice.has_tokenizer:
        return models.load_tokenizer(OmegaConf.merge(choice.config, {"path": str(choice.export)}))
    return models.load_tokenizer(choice.config, cache_dir=cache_dir)


def load_head(model: PreTrainedModel, choice: RunModel) -> tuple[SequenceClassifier, list[str]] | None:
    """The projection head the export saved, on its (restored) backbone `model`, with its class names; None
    when it saved none."""
    return classifier_head.load(model, choice.export) if choice.export is not None else None


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


def _export_dir(cfg: DictConfig) -> Path | None:
    """The directory `cfg.ckpt` names (a run dir's final/ when given a run dir), or None (the base
    model)."""
    if not cfg.get("ckpt"):
        return None
    directory = Path(cfg.ckpt)
    return directory / "final" if (directory / "final").is_dir() else directory


def _layout(export: Path | None, cfg: DictConfig) -> str:
    """What `export` holds (RunModel.layout); a directory with no saved run in it raises FileNotFoundError."""
    if export is None:
        return "base"
    if export.is_file() and export.suffix == ".ckpt":
        raise FileNotFoundError(
            f"ckpt={cfg.ckpt}: a training checkpoint, which train.py resumes from (ckpt_path={cfg.ckpt}); "
            f"ckpt= takes the run dir it belongs to ({export.parent.parent})"
        )
    markers = (
        ("adapter", ADAPTER_CONFIG),
        ("method", METHOD_FILE),
        ("whole", MODEL_CONFIG),
        ("edit", DELTAS_FILE),
    )
    for layout, marker in markers:
        if (export / marker).exists():
            return layout
    raise FileNotFoundError(
        f"ckpt={cfg.ckpt}: expected a train.py or analysis.memit run dir (with final/), a peft adapter "
        f"dir ({ADAPTER_CONFIG}), a frozen-base method dir ({METHOD_FILE}), a save_pretrained dir "
        f"({MODEL_CONFIG}) or an edit ({DELTAS_FILE})"
    )


def _current_keys(config: dict[str, Any]) -> dict[str, Any]:
    """A saved model config in today's keys: runs saved before `model.scratch` was renamed
    `model.architecture` load as they were trained."""
    if config.get("scratch") is not None and config.get("architecture") is None:
        config = {**config, "architecture": config["scratch"]}
    return {key: value for key, value in config.items() if key != "scratch"}


def _saved_identity(directory: Path) -> dict[str, Any] | None:
    return json.loads(path.read_text()) if (path := directory / BASE_MODEL_FILE).exists() else None


def _load_adapter(base: PreTrainedModel, directory: Path) -> PeftModel:
    """A peft adapter on `base`; a corrupt adapter file raises ValueError naming it."""
    try:
        return PeftModel.from_pretrained(base, directory)
    except Exception:
        weights = directory / "adapter_model.safetensors"
        if weights.exists():
            read_safetensors(weights)  # raises the error that names a damaged file
        raise


def _add_deltas(model: PreTrainedModel, path: Path) -> PreTrainedModel:
    """`model` with each weight delta of `path` added (in float32, stored in the weight's dtype); a delta
    for a weight the model lacks or shapes otherwise raises ValueError naming the file."""
    for name, delta in read_safetensors(path).items():
        try:
            weight = model.get_parameter(name)
        except AttributeError as error:
            raise ValueError(f"{path}: {name} is not a weight of {type(model).__name__}") from error
        if weight.shape != delta.shape:
            raise ValueError(
                f"{path}: {name} is {tuple(delta.shape)} here, {tuple(weight.shape)} in the model"
            )
        with torch.no_grad():
            weight.copy_((weight.float() + delta.to(weight.device)).to(weight.dtype))
    return model
