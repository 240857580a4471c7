"""`python -m runtime.export ckpt=<run dir> out=<dir>`: a saved run as a standalone transformers model that
`AutoModelForCausalLM.from_pretrained` and vLLM load without lmlab.

The run's model is loaded as `ckpt=` loads it everywhere (runtime/saved_run.py); a peft adapter whose
method adds to the base's weights (LoRA and its variants, AdaLoRA, VeRA, IA3) is folded into them
(`merge_and_unload`); a whole model or a MEMIT edit is already plain weights. What cannot be folded (prompt
tuning's virtual tokens are inputs, bottleneck adapters and projection heads are modules the base lacks) is
refused with the reason. The folder gets the weights as safetensors, config and generation config, the
tokenizer with its chat template, and `lmlab_export.json` saying what it was made from."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import hydra
import lightning as L
from omegaconf import DictConfig
from peft import PeftModel
from transformers import PreTrainedModel

from runtime import saved_run

log = logging.getLogger(__name__)

EXPORT_FILE = "lmlab_export.json"


class NotMergeableError(ValueError):
    """The run's method cannot be folded into the base model's weights."""


def merged(model: PreTrainedModel, choice: saved_run.RunModel) -> PreTrainedModel:
    """`model` (loaded from `choice`) as plain transformers weights: an adapter folded into its base."""
    if saved_run.load_head(model, choice) is not None:
        raise NotMergeableError(
            f"ckpt={choice.ckpt}: a projection-head classifier; its head is not part of a causal LM, so it "
            "keeps its own export (evaluate.py ckpt=<run dir>)"
        )
    if choice.layout == "method":
        raise NotMergeableError(
            f"ckpt={choice.ckpt}: the method saved in {saved_run.METHOD_FILE} adds modules the base model "
            "lacks (bottleneck adapters); it keeps its own export (ckpt=<run dir>)"
        )
    if not isinstance(model, PeftModel):
        return model
    config = model.peft_config[model.active_adapter]
    if config.is_prompt_learning:
        raise NotMergeableError(
            f"ckpt={choice.ckpt}: {config.peft_type.value} prepends trained virtual tokens to the input, "
            "which no weight of the base can hold; it keeps its own export (ckpt=<run dir>)"
        )
    return model.merge_and_unload()


def export(cfg: DictConfig) -> Path:
    """Write the run `cfg.ckpt` names to `cfg.out` as a standalone transformers model; return the folder."""
    out = Path(cfg.out)
    if out.exists() and any(out.iterdir()) and not cfg.overwrite:
        raise FileExistsError(f"out={out}: exists and is not empty; pass overwrite=true to replace it")
    choice = saved_run.resolve(cfg)
    if choice.layout == "base":
        raise ValueError("ckpt=: name the train.py or analysis.memit run to export")
    L.seed_everything(cfg.seed)  # a from-scratch base is random: the training run's seed rebuilds it
    model, tokenizer = saved_run.load(choice)
    plain = merged(model, choice)
    out.mkdir(parents=True, exist_ok=True)
    plain.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    (out / EXPORT_FILE).write_text(json.dumps(description(choice), indent=2) + "\n")
    log.info("exported %s (%s) to %s", choice.ckpt, choice.layout, out)
    if cfg.push_to_hub:
        push(out, str(cfg.push_to_hub))
    return out


def description(choice: saved_run.RunModel) -> dict[str, Any]:
    """What an export was made from: the run, how its weights were stored, its base model."""
    return {
        "ckpt": str(choice.ckpt),
        "layout": choice.layout,
        "merged": choice.layout == "adapter",
        "base_model": choice.saved_identity,
    }


def push(out: Path, repo: str) -> None:
    """Upload the export folder `out` to hub repo `repo`; refused, saying why, offline or without a token."""
    from huggingface_hub import HfApi, get_token

    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false"):
        raise RuntimeError(f"push_to_hub={repo}: HF_HUB_OFFLINE is set; the export is in {out}")
    if get_token() is None:
        raise RuntimeError(
            f"push_to_hub={repo}: no Hugging Face token (set HF_TOKEN or run `huggingface-cli login`); "
            f"the export is in {out}"
        )
    api = HfApi()
    api.create_repo(repo, exist_ok=True)
    api.upload_folder(repo_id=repo, folder_path=str(out))


@hydra.main(version_base="1.3", config_path="../conf", config_name="export")
def main(cfg: DictConfig) -> None:
    """Hydra entrypoint."""
    export(cfg)


if __name__ == "__main__":
    main()
