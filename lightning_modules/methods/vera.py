"""VeRA (Kopiczko et al. 2024) through peft: one pair of frozen random matrices A, B shared by every adapted
layer, and per layer only two trained scaling vectors (d on the rank, b on the output), so the trainable count
is ~(r + out) per layer instead of LoRA's r * (in + out). The shared matrices come from
`projection_seed` and are saved with the export."""

from __future__ import annotations

from collections.abc import Sequence

from peft import PeftModel, VeraConfig
from transformers import PreTrainedModel

from lightning_modules.methods import MethodContext
from lightning_modules.methods.lora import adapted_model, resolve_targets
from modeling import architecture

SUPPORTS = ("causal_lm", "label_lm")  # the task modules it can train


def apply(
    model: PreTrainedModel,
    context: MethodContext,
    r: int = 256,
    dropout: float = 0.0,
    d_initial: float = 0.1,
    projection_seed: int = 0,
    target_modules: Sequence[str] | str | None = None,
) -> PeftModel:
    """Freeze the base and add VeRA on `target_modules` (as method=lora chooses them): shared random rank-`r`
    projections, trained scaling vectors (d starting at `d_initial`, b at zero: the model starts as the
    base)."""
    config = VeraConfig(
        r=r,
        target_modules=resolve_targets(target_modules, context.model_cfg, model),
        vera_dropout=dropout,
        d_initial=d_initial,
        projection_prng_key=projection_seed,
        save_projection=True,
        task_type="CAUSAL_LM",
        fan_in_fan_out=architecture.stores_transposed_linears(model),
    )
    return adapted_model(model, config, "method=vera")
