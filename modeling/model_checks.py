"""What a loaded model is checked against: finite weights, the buffers no checkpoint holds rebuilt, and the
identity of the base model a trained method belongs to (refused on another base)."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from safetensors.torch import load_file
from transformers import (
    PreTrainedModel,
)

# where a model built by lmlab keeps the identity of its base model (set before a method changes it)
BASE_IDENTITY_ATTR = "lmlab_base_model"


class ModelLoadError(RuntimeError):
    """A model or tokenizer could not be loaded; the message says which option fixes it."""


def check_finite(model: torch.nn.Module, what: str) -> None:
    """Refuse a model with a non-finite parameter or buffer, naming them (a bad checkpoint or uninitialised
    memory)."""
    tensors = [*model.named_parameters(), *model.named_buffers()]
    bad = [
        name
        for name, tensor in tensors
        if tensor.is_floating_point()
        and tensor.device.type != "meta"  # meta: offloaded to disk, unread
        and not bool(torch.isfinite(tensor).all())
    ]
    if bad:
        raise ModelLoadError(
            f"{what}: non-finite values (NaN or inf) in {len(bad)} tensor(s) after loading: "
            f"{', '.join(bad[:5])}{' ...' if len(bad) > 5 else ''}. The checkpoint is damaged or the "
            "model's code leaves them uninitialised; re-save it or fix its initialisation."
        )


def rebuild_unsaved_buffers(model: PreTrainedModel) -> None:
    """Set the buffers no checkpoint holds (non-persistent: rotary tables, masks) to the values the model's
    own construction gives them. transformers 5 loads into uninitialised memory and re-initialises only what
    the model's `_init_weights` knows, which remote code often does not; the skeleton built here has its
    parameters on the meta device, so this costs the buffers alone."""
    from accelerate import init_empty_weights

    unsaved = [
        (module, name)
        for module in model.modules()
        for name in module._non_persistent_buffers_set
        if module._buffers.get(name) is not None
    ]
    if not unsaved:
        return
    with init_empty_weights(include_buffers=False):
        skeleton = type(model)(model.config)
    built = dict(zip(model.modules(), skeleton.modules(), strict=True))
    for module, name in unsaved:
        buffer, fresh = module._buffers[name], built[module]._buffers[name]
        module._buffers[name] = fresh.to(device=buffer.device, dtype=buffer.dtype)


def base_identity(model: torch.nn.Module, cfg: DictConfig) -> dict[str, Any]:
    """What a trained method must be applied to: config name, weight source, architecture class, and a
    fingerprint (sha256 of every parameter's name and shape), taken from the base model before a method
    changes it."""
    shapes = "\n".join(f"{name}:{tuple(p.shape)}" for name, p in model.named_parameters())
    source = cfg.get("path") or cfg.get("hub_id") or (cfg.gguf.file if cfg.get("gguf") else None) or "scratch"
    return {
        "name": cfg.name,
        "source": str(source),
        "revision": cfg.get("revision"),
        "architecture": type(model).__name__,
        "fingerprint": hashlib.sha256(shapes.encode()).hexdigest()[:16],
        "config": OmegaConf.to_container(cfg, resolve=True),
    }


def check_same_base(
    saved: dict[str, Any] | None, current: dict[str, Any] | None, where: str, allow: bool
) -> None:
    """Raise ModelLoadError when `saved` (from a checkpoint or export at `where`) names another base model
    than `current`, unless `allow` (the allow_base_mismatch override)."""
    if not saved or not current or saved["fingerprint"] == current["fingerprint"] or allow:
        return
    raise ModelLoadError(
        f"{where} was trained on model '{saved['name']}' ({saved['architecture']}, {saved['source']}, "
        "fingerprint "
        f"{saved['fingerprint']}), but this run built model '{current['name']}' ({current['architecture']}, "
        f"{current['source']}, fingerprint {current['fingerprint']}). Pass model={saved['name']} (or leave "
        "model= out "
        "for evaluate.py), or allow_base_mismatch=true if you really mean to apply it to another base."
    )


def read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file; a corrupt or truncated file raises ValueError naming it."""
    try:
        return load_file(path)
    except Exception as error:  # safetensors raises SafetensorError / OSError for damaged files
        raise ValueError(
            f"{path}: not a readable safetensors file, truncated or corrupt ({error}); re-export it"
        ) from error
