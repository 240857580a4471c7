"""How LoRA's variants start and how they are saved, through peft: the initialisations of `method.init`
(peft's default, gaussian, PiSSA, OLoRA, EVA from layer inputs, LoftQ on a 4-bit base), refused by key where
peft cannot compute one on a model, and the export of a PiSSA / OLoRA adapter, whose base holds a residual,
as a plain LoRA of twice the rank on the unchanged base (`save_adapter`)."""

from __future__ import annotations

import re
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from peft import (
    EvaConfig,
    LoraConfig,
    PeftModel,
    get_peft_model_state_dict,
    initialize_lora_eva_weights,
    replace_lora_weights_loftq,
)
from safetensors.torch import load_file, save_file
from transformers import PreTrainedModel

from datamodules.padding_free import model_inputs
from modeling import architecture

# method.init -> peft's init_lora_weights; pissa_niter_<k> (PiSSA by a k-iteration randomized SVD) too
INITS = {
    "default": True,
    "gaussian": "gaussian",
    "pissa": "pissa",
    "olora": "olora",
    "eva": "eva",
    "loftq": True,  # then replaced by LoftQ's factors of the 4-bit base's error (loftq_initialised)
}
PISSA_NITER = re.compile(r"pissa_niter_[1-9]\d*")
# initialisations that move part of each base weight into the adapter (the base keeps the residual)
RESIDUAL_INITS = ("pissa", "olora")
# where a PeftModel keeps its adapter's initial weights when its base holds a residual (see save_adapter)
INITIAL_ADAPTER_ATTR = "lmlab_initial_adapter"
ADAPTER_WEIGHTS = "adapter_model.safetensors"


def peft_init(init: str) -> bool | str:
    """peft's `init_lora_weights` for `method.init`; ValueError naming the key for an unknown one."""
    if init in INITS:
        return INITS[init]
    if PISSA_NITER.fullmatch(str(init)):
        return init
    raise ValueError(f"method.init={init!r}: expected one of {sorted(INITS)} or pissa_niter_<k>")


def check_init(init: str, model: PreTrainedModel, parameters: Sequence[str]) -> None:
    """Refuse, naming the keys, an initialisation peft cannot compute on this model: PiSSA, OLoRA, EVA and
    LoftQ decompose a module's 2-D weight or its input (the fused experts' 3-D parameters are neither), and
    peft's OLoRA reads a Conv1D weight the wrong way round (GPT-2's layout: a shape error)."""
    if init not in ("default", "gaussian") and parameters:
        raise ValueError(
            f"method.init={init}: peft computes it from a linear module's weight or inputs, and the fused "
            f"expert parameters {list(parameters)} (method.target_parameters) are not a module; set "
            "method.target_parameters=[] to adapt the linear modules only"
        )
    if init == "loftq" and not getattr(model, "is_loaded_in_4bit", False):  # nf4, not int8
        raise ValueError(
            "method.init=loftq initialises LoRA against the quantization error of a 4-bit base: it needs "
            "model.quantization=nf4 (on a machine with CUDA and bitsandbytes)"
        )
    if init == "olora" and architecture.stores_transposed_linears(model):
        raise ValueError(
            f"method.init=olora: peft's OLoRA does not handle the transposed (Conv1D) weights "
            f"{type(model).__name__} stores; use method.init=pissa, which does"
        )


def variant_options(
    use_dora: bool,
    use_rslora: bool,
    init: str,
    eva_rho: float = 2.0,
    eva_tau: float = 0.99,
    eva_label_mask: bool = True,
) -> dict[str, Any]:
    """The LoraConfig keywords of the variant keys (DoRA, rsLoRA, the initialisation)."""
    options: dict[str, Any] = {"use_dora": bool(use_dora), "use_rslora": bool(use_rslora)}
    options["init_lora_weights"] = peft_init(init)
    if init == "eva":
        options["eva_config"] = EvaConfig(rho=eva_rho, tau=eva_tau, use_label_mask=eva_label_mask)
    return options


class EvaNotConverged(RuntimeError):
    """EVA's estimates did not settle within the passes allowed over its batches."""


def eva_initialised(model: PeftModel, batches: list[dict[str, torch.Tensor]], max_passes: int) -> PeftModel:
    """EVA (Paischer et al. 2024): each adapter's A from the top right-singular vectors of its layer's inputs
    (response tokens only, unless the EVA config says otherwise), estimated incrementally over the training
    `batches`, cycled until the components converge (peft's criterion: cosine similarity `EvaConfig.tau`
    between successive estimates), at most `max_passes` times; ranks redistributed by explained variance.
    ValueError naming the keys where a batch has fewer such tokens than components to estimate (peft would
    cycle forever), or where the estimates do not settle in time."""
    config = model.peft_config[model.active_adapter]
    components = round(config.r * config.eva_config.rho)
    fewest = min(int(eva_token_mask(batch, config).sum()) for batch in batches)
    if fewest < components:
        kind = "response" if config.eva_config.use_label_mask else "real"
        raise ValueError(
            f"method.init=eva estimates {components} components (method.r x method.eva_rho) per layer from "
            f"each batch's {kind} tokens, and a training batch has only {fewest}: raise data.batch_size, or "
            "set method.eva_label_mask=false (every token)"
        )
    calls = 0

    def forward(model: PeftModel, batch: dict[str, torch.Tensor]) -> Any:
        nonlocal calls
        calls += 1
        if calls > max_passes * len(batches):
            raise EvaNotConverged
        return model(**model_inputs(batch))

    try:
        initialize_lora_eva_weights(
            model,
            dataloader=batches,
            forward_fn=forward,
            prepare_model_inputs_fn=eva_token_mask,
            prepare_layer_inputs_fn=eva_layer_rows,
            show_progress_bar=False,
        )
    except EvaNotConverged:
        raise ValueError(
            f"method.init=eva: the estimates did not converge to method.eva_tau={config.eva_config.tau} in "
            f"method.eva_max_passes={max_passes} passes over {len(batches)} batches (a routed expert may see "
            "few tokens): lower eva_tau, or raise init_batches or eva_max_passes"
        ) from None
    return model


def eva_token_mask(batch: dict[str, torch.Tensor], config: LoraConfig) -> torch.Tensor:
    """The tokens whose layer inputs EVA decomposes: real tokens ([B, T] bool), responses only when the
    EVA config masks by label (peft's default)."""
    mask = batch.get("attention_mask", torch.ones_like(batch["input_ids"])).bool()
    if config.eva_config.use_label_mask and "labels" in batch:
        mask &= batch["labels"] != config.eva_config.label_mask_value
    return mask


def eva_layer_rows(layer_input: Any, mask: torch.Tensor, layer_name: str) -> torch.Tensor:
    """A layer's input rows at the masked tokens ([N, H]), for a layer that sees [B, T, H] or the tokens
    flattened ([B*T, H]: OPT's MLP); a layer that sees a routed subset of the tokens (an expert) gives every
    row it saw (peft's own reader assumes [B, T, H])."""
    rows = layer_input[0] if isinstance(layer_input, (tuple, list)) else layer_input
    if rows.shape[: mask.dim()] == mask.shape:
        return rows[mask]
    if rows.dim() == 2 and rows.shape[0] == mask.numel():
        return rows[mask.flatten()]
    return rows.reshape(-1, rows.shape[-1])


def loftq_initialised(model: PeftModel) -> PeftModel:
    """LoftQ (Li et al. 2023) on a 4-bit base: A and B chosen so that base + BA approximates the unquantized
    weights (peft's `replace_lora_weights_loftq`, which reads them from the model's safetensors)."""
    replace_lora_weights_loftq(model)
    return model


def keep_initial_adapter(model: PeftModel) -> PeftModel:
    """Keep a copy of the adapter's initial weights on `model`, for an init whose base holds a residual."""
    state = get_peft_model_state_dict(model)
    setattr(model, INITIAL_ADAPTER_ATTR, {name: value.detach().clone() for name, value in state.items()})
    return model


def save_adapter(model: PeftModel, target: Path) -> None:
    """`model.save_pretrained(target)`; a PiSSA / OLoRA adapter (its base holds a residual) converted to a
    plain LoRA of twice the rank on the unchanged base: A' = [A; A0], B' = [B, -B0], so that
    W + B'A' = W_res + BA (peft's conversion, from the initial weights kept at apply)."""
    initial = getattr(model, INITIAL_ADAPTER_ATTR, None)
    if initial is None:
        model.save_pretrained(target, safe_serialization=True)
        return
    with tempfile.TemporaryDirectory() as scratch:
        path = Path(scratch) / "initial"
        path.mkdir()
        save_file({name: value.contiguous() for name, value in initial.items()}, path / ADAPTER_WEIGHTS)
        model.save_pretrained(
            target, safe_serialization=True, path_initial_model_for_weight_conversion=str(path)
        )
    # peft's conversion keeps only A and B: DoRA's magnitudes (equal before and after it) are added back
    converted = load_file(target / ADAPTER_WEIGHTS)
    kept = {
        name: value.contiguous()
        for name, value in get_peft_model_state_dict(model).items()
        if name not in converted
    }
    if kept:
        save_file({**converted, **kept}, target / ADAPTER_WEIGHTS)
