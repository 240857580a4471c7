"""GradSim on a mixture of experts without a dense path (Mixtral, OLMoE): per-example gradients of the output
projections of every routed expert of the target layers, fused (one 3-D weight, [E, out, in], or [E, in, out]
where the experts module says `is_transposed`) or modular (each expert's linear map back to the hidden width).

Routing depends on the data, so the rows one expert receives cannot be traced back to their examples from one
batched backward as the dense trick does (analysis/gradsim.py); each example gets its own backward. An
expert that none of an example's tokens was routed to gets a zero block. With `projection_dim` every expert's
[out, in] gradient is projected by the layer's Kronecker-factored Gaussian map A g B^T, as in the dense case.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from modeling.architecture import bare_model, decoder_blocks, structure
from modeling.expert_layers import expert_layers
from modeling.experts import has_experts
from modeling.log_probs import answer_log_probs
from modeling.probe import StructureError


def routed_only(model: nn.Module) -> bool:
    """Whether `model` is a mixture of experts with no dense MLP output projection beside its experts."""
    return structure(model).mlp_output is None and has_experts(model)


def expert_output_weights(model: nn.Module, layers: list[int]) -> list[tuple[str, list[torch.Tensor], bool]]:
    """Per layer of `layers`: (name, the experts' output-projection weights, whether stored [in, out]): one
    fused 3-D weight, or each modular expert's 2-D weight."""
    hidden = bare_model(model).config.hidden_size
    found = []
    for index in layers:
        block = decoder_blocks(model)[index]
        for layer in expert_layers(block):
            experts = block.get_submodule(layer.experts)
            if layer.fused:
                transposed = bool(getattr(experts, "is_transposed", False))
                weights = [
                    (name, block.get_parameter(name))
                    for name in layer.fused
                    if _writes_hidden(block.get_parameter(name).shape[1:], hidden, transposed)
                ]
            else:
                transposed = False
                weights = [
                    (f"{layer.experts}.{e}.{key}", module.weight)
                    for e, expert in enumerate(experts)
                    for key, module in expert.named_modules()
                    if isinstance(module, nn.Linear) and _writes_hidden(module.weight.shape, hidden, False)
                ]
            if len(weights) != (1 if layer.fused else layer.count):  # one per expert, or one fused
                raise StructureError(
                    f"{structure(model).blocks}.{index}.{layer.experts}: no single output projection back to "
                    f"the hidden width ({hidden}) per expert"
                )
            names = [name for name, _ in weights]
            label = names[0] if layer.fused else f"{layer.experts}.*.{names[0].rsplit('.', 1)[-1]}"
            found.append((f"{structure(model).blocks}.{index}.{label}", [w for _, w in weights], transposed))
    return found


def _writes_hidden(shape: torch.Size, hidden: int, transposed: bool) -> bool:
    out_features, in_features = (shape[1], shape[0]) if transposed else (shape[0], shape[1])
    return out_features == hidden != in_features


def block_shape(weights: list[torch.Tensor], transposed: bool) -> tuple[int, int, int]:
    """(experts, out, in) of one layer's expert output projections."""
    if len(weights) == 1:  # fused
        experts, rows, columns = weights[0].shape
        return (experts, columns, rows) if transposed else (experts, rows, columns)
    return (len(weights), *weights[0].shape)


def expert_blocks(
    weights: list[torch.Tensor], transposed: bool, gradients: list[torch.Tensor]
) -> torch.Tensor:
    """The experts' gradients of one layer as [E, out, in]."""
    if len(weights) == 1:  # fused
        return gradients[0].transpose(1, 2) if transposed else gradients[0]
    return torch.stack(gradients)


class RoutedExpertGradients:
    """Per-example gradients (optionally Kronecker-projected) of the routed experts' output projections."""

    def __init__(
        self, model: nn.Module, layers: list[int], projection_dim: int | None = None, seed: int = 0
    ) -> None:
        self.model, self.targets = model, expert_output_weights(model, layers)
        self.projections: list[tuple[torch.Tensor, torch.Tensor]] = []
        if projection_dim:
            shapes = [block_shape(weights, transposed) for _, weights, transposed in self.targets]
            side = math.ceil(math.sqrt(projection_dim / sum(experts for experts, _, _ in shapes)))
            generator = torch.Generator().manual_seed(seed)
            for _, out_features, in_features in shapes:
                self.projections.append(
                    (
                        torch.randn(side, out_features, generator=generator) / math.sqrt(side),
                        torch.randn(side, in_features, generator=generator) / math.sqrt(side),
                    )
                )

    def __call__(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """[B, D] gradients of each example's answer log-probability, layers (and experts) concatenated."""
        weights = [w for _, layer, _ in self.targets for w in layer]
        trainable = [p for p in self.model.parameters() if p.requires_grad]
        rows = []
        try:
            self.model.requires_grad_(False)
            for weight in weights:
                weight.requires_grad_(True)
            for row in range(len(batch["input_ids"])):
                example = {key: value[row : row + 1] for key, value in batch.items()}
                found = torch.autograd.grad(
                    answer_log_probs(self.model, example).sum(), weights, allow_unused=True
                )  # None: a modular expert no token of the example was routed to
                rows.append(
                    self._vector(
                        [torch.zeros_like(w) if g is None else g for w, g in zip(weights, found, strict=True)]
                    )
                )
        finally:
            self.model.requires_grad_(False)
            for parameter in trainable:
                parameter.requires_grad_(True)
        return torch.stack(rows)

    def _vector(self, gradients: list[torch.Tensor]) -> torch.Tensor:
        parts = []
        for index, (_, weights, transposed) in enumerate(self.targets):
            taken, gradients = gradients[: len(weights)], gradients[len(weights) :]
            blocks = expert_blocks(weights, transposed, [g.float() for g in taken])  # [E, out, in]
            if self.projections:
                a, b = self.projections[index]
                blocks = torch.einsum("ko,eoi,li->ekl", a, blocks, b)
            parts.append(blocks.flatten())
        return torch.cat(parts)
