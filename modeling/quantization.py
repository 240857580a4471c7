"""`model.quantization=nf4|int8`: the base model's linear weights loaded in 4-bit NormalFloat (QLoRA, Dettmers
et al. 2023: double quantization, computing in the model's dtype) or 8-bit, through bitsandbytes, for LoRA-
family methods to train on top. bitsandbytes' kernels need CUDA: on a machine without it (or without the
package) the key is refused, saying which, before any weights load."""

from __future__ import annotations

import importlib.util
from typing import Any

import torch
from omegaconf import DictConfig

from modeling.model_checks import ModelLoadError

QUANTIZATIONS = ("nf4", "int8")


def unavailable_reason() -> str | None:
    """Why bitsandbytes cannot quantize here (None: it can)."""
    if importlib.util.find_spec("bitsandbytes") is None:
        return "needs the bitsandbytes package (pip install bitsandbytes), which is not installed"
    if not torch.cuda.is_available():
        return f"bitsandbytes' 4-/8-bit kernels need a CUDA device; this torch ({torch.__version__}) has none"
    return None


def quantization_kwargs(cfg: DictConfig, dtype: torch.dtype) -> dict[str, Any]:
    """The `from_pretrained` keywords of `model.quantization` (none when null), computing in `dtype`;
    ModelLoadError naming the key where it cannot apply."""
    kind = cfg.get("quantization")
    if kind is None:
        return {}
    if kind not in QUANTIZATIONS:
        raise ModelLoadError(f"model.quantization={kind!r}: expected one of {list(QUANTIZATIONS)} or null")
    if cfg.get("architecture") or cfg.get("from_scratch"):
        raise ModelLoadError(
            f"model.quantization={kind}: quantizes pretrained weights as they load (model.path, hub_id, "
            "gguf); a fresh model from model.architecture has none to quantize"
        )
    reason = unavailable_reason()
    if reason is not None:
        raise ModelLoadError(f"model.quantization={kind}: {reason}")
    from transformers import BitsAndBytesConfig

    if kind == "int8":
        return {"quantization_config": BitsAndBytesConfig(load_in_8bit=True)}
    config = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=dtype,
    )
    return {"quantization_config": config}


def is_quantized(model: torch.nn.Module) -> bool:
    """Whether `model`'s weights were loaded quantized (they cannot train themselves)."""
    return bool(getattr(model, "is_loaded_in_4bit", False) or getattr(model, "is_loaded_in_8bit", False))
