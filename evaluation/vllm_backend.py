"""Generation through vLLM (`evaluate.py generation.backend=vllm`): the same prompts, token ids, stop strings,
decoding and extraction as lmlab's own generation; vLLM only chooses the tokens (paged attention, continuous
batching, `generation.vllm.tensor_parallel_size` / `pipeline_parallel_size` over GPUs).

- The engine loads the weights from where lmlab would (model.path, the dequantised GGUF copy, the hub id
  at model.revision, or a full fine-tuning run's final/); a LoRA run (`ckpt=`) is served as a vLLM LoRA
  adapter on its base. lmlab itself loads only the tokenizer.
- Prompts go in as lmlab's token ids; completions come back as token ids, decoded by lmlab's tokenizer and cut
  at the first stop string as lmlab's own are, so the text scored is what lmlab's generation would give for
  the same tokens.
- Greedy decoding is temperature 0; sampling takes temperature, top_p and a seed per prompt (cfg.seed + item).
- Refused by key: a task scored by log-likelihood, `devices` > 1 and `model.device_map` (vLLM parallelises
  itself), a fresh model (model.architecture / from_scratch: no weights to load), a run of a method other than
  LoRA (vLLM serves LoRA adapters only).

vLLM is an optional extra (`pip install 'lmlab[vllm]'`); docs/scaling.md says which versions install beside
lmlab's.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from transformers import PreTrainedTokenizerBase

from modeling import models
from modeling.generation import truncate_at_stop
from modeling.vllm_policy import INSTALL_HINT
from runtime.saved_run import ADAPTER_CONFIG, METHOD_FILE, RunModel

SUPPORTED_LORA_RANKS = (8, 16, 32, 64, 128, 256, 320, 512)  # vLLM's accepted max_lora_rank values


def backend(cfg: DictConfig) -> str:
    """`generation.backend` (lmlab when unset; its value is checked with the run's config:
    runtime/validate.py)."""
    return (cfg.get("generation") or {}).get("backend") or "lmlab"


def check(cfg: DictConfig, evaluation_kind: str) -> None:
    """Refuse a task the vLLM backend cannot score (the config rules are runtime/validate.py's); say how to
    install vLLM when it is missing."""
    if evaluation_kind != "generation":
        raise ValueError(
            f"generation.backend=vllm generates text, but task '{cfg.task.name}' is scored by "
            f"{evaluation_kind} (log-likelihoods); use generation.backend=lmlab"
        )
    if importlib.util.find_spec("vllm") is None:
        raise ModuleNotFoundError(
            f"generation.backend=vllm needs vLLM, which is not installed: {INSTALL_HINT}"
        )


def weights(cfg: DictConfig, choice: RunModel) -> tuple[str, str | None, Path | None]:
    """(what the engine loads: a directory or hub id; its revision; the LoRA adapter dir of `ckpt=`, or
    None)."""
    if choice.layout == "method":
        method = json.loads((choice.export / METHOD_FILE).read_text()).get("name", "?")
        raise ValueError(
            f"ckpt={choice.ckpt} was trained with method={method}: vLLM serves LoRA adapters only"
        )
    if choice.layout == "edit":
        raise ValueError(
            f"ckpt={choice.ckpt} is a MEMIT edit (weight deltas): vLLM cannot serve it; use backend=lmlab"
        )
    if choice.layout == "adapter":
        adapter = json.loads((choice.export / ADAPTER_CONFIG).read_text())
        if adapter.get("peft_type") != "LORA":
            raise ValueError(
                f"ckpt={choice.ckpt} is a {adapter.get('peft_type')} adapter: vLLM serves LoRA adapters only"
            )
        return *_base_weights(cfg), choice.export
    if choice.layout == "whole":
        return str(choice.export), None, None
    return *_base_weights(cfg), None


def _base_weights(cfg: DictConfig) -> tuple[str, str | None]:
    """The base model's weight source and, outside a local directory, its revision."""
    source = models.weight_source(cfg.model, cfg.paths.cache_dir)
    pinned = cfg.model.get("revision") and not Path(source).is_dir()
    return source, (str(cfg.model.revision) if pinned else None)


def generate(
    cfg: DictConfig,
    choice: RunModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: list[str],
    settings: dict[str, Any],
) -> list[list[str]]:
    """`settings["num_samples"]` completions per prompt from a vLLM engine, decoded and cut as lmlab's are
    (`settings`: lmlab's generation keywords, stop strings resolved)."""
    from vllm import LLM, SamplingParams
    from vllm.lora.request import LoRARequest

    source, revision, adapter = weights(cfg, choice)
    engine = cfg.generation.vllm
    extra = OmegaConf.to_container(engine.engine_args, resolve=True) if engine.get("engine_args") else {}
    if adapter is not None:
        rank = json.loads((adapter / ADAPTER_CONFIG).read_text())["r"]
        extra |= {"enable_lora": True, "max_lora_rank": min(r for r in SUPPORTED_LORA_RANKS if r >= rank)}
    llm = LLM(
        model=source,
        revision=revision,
        seed=int(cfg.seed),
        trust_remote_code=bool(cfg.model.get("trust_remote_code")),
        tensor_parallel_size=int(engine.tensor_parallel_size),
        pipeline_parallel_size=int(engine.pipeline_parallel_size),
        gpu_memory_utilization=float(engine.gpu_memory_utilization),
        dtype=str(engine.dtype or "auto"),  # null: the weights' own
        **extra,
    )
    sampled = bool(settings["do_sample"])
    params = [
        SamplingParams(
            n=int(settings["num_samples"]),
            temperature=float(settings["temperature"]) if sampled else 0.0,
            top_p=float(settings["top_p"]) if sampled else 1.0,
            max_tokens=int(settings["max_new_tokens"]),
            stop=list(settings["stop_strings"]),
            seed=int(cfg.seed) + index if sampled else None,
        )
        for index in range(len(prompts))
    ]
    inputs = [{"prompt_token_ids": ids} for ids in tokenizer(list(prompts))["input_ids"]]
    request = LoRARequest("ckpt", 1, str(adapter)) if adapter is not None else None
    results = llm.generate(inputs, params, lora_request=request)
    stops = settings["stop_strings"]
    return [
        [truncate_at_stop(tokenizer.decode(c.token_ids, skip_special_tokens=True), stops) for c in r.outputs]
        for r in results
    ]
