"""(IA)^3 (Liu et al. 2022) through peft: trained vectors that rescale activations, one entry per channel. On
every linear map of the decoder blocks (as method=lora chooses them) the output is rescaled; on the MLP's
output projection (found in the model) its input, the MLP's inner activation, as the paper's l_ff. The
fewest trainable parameters of the methods here; it starts as the base (vectors at one)."""

from __future__ import annotations

from collections.abc import Sequence

from peft import IA3Config, PeftModel
from transformers import PreTrainedModel

from lightning_modules.methods import MethodContext
from lightning_modules.methods.lora import adapted_model, resolve_targets
from modeling import architecture

SUPPORTS = ("causal_lm", "label_lm")  # the task modules it can train


def feedforward_targets(model: PreTrainedModel, targets: list[str]) -> list[str]:
    """The targets that name the MLP's output projection (a path within a block, or its last component):
    (IA)^3 rescales their input. None where the MLP has no single dense output (fused experts)."""
    output = architecture.structure(model).mlp_output
    return [
        name for name in targets if output is not None and (output == name or output.endswith("." + name))
    ]


def apply(
    model: PreTrainedModel,
    context: MethodContext,
    target_modules: Sequence[str] | str | None = None,
    feedforward_modules: Sequence[str] | None = None,
) -> PeftModel:
    """Freeze the base and add (IA)^3 scaling vectors on `target_modules` (as method=lora chooses them), the
    input of `feedforward_modules` (null: the MLP output projection) and the output of the others."""
    targets = resolve_targets(target_modules, context.model_cfg, model)
    if feedforward_modules is None:
        feedforward_modules = feedforward_targets(model, targets)
    config = IA3Config(
        target_modules=targets,
        feedforward_modules=list(feedforward_modules),
        task_type="CAUSAL_LM",
        fan_in_fan_out=architecture.stores_transposed_linears(model),
    )
    return adapted_model(model, config, "method=ia3")
