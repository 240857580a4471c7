"""Where MEMIT reads its keys and writes its update in one edited layer: the MLP output projection of a dense
path (every dense decoder, and a mixture with a shared expert), or, in a mixture without one (Mixtral, OLMoE),
the output projection of every routed expert.

A routed MoE layer computes y = sum_e g_e(x) W_e k_e(x) over the experts e that x is routed to (g_e: the
routing weight, k_e: expert e's down-projection input, W_e: its output projection). Stacking the experts,
y = [W_1 ... W_E] [g_1 k_1; ...; g_E k_E]: one linear map of the gate-weighted keys, zero for the experts x is
not routed to. MEMIT is solved for that stacked map (Maksimov et al. 2026, arXiv:2605.16686, "Scalable
Knowledge Editing for Mixture-of-Experts LLMs via Tensor-Structured Updates"; the gate-weighted, per-expert
block structure is MoEEdit's, Gu et al., ICLR 2026): each expert's key is its gate-weighted down-projection
input, its second moment C_e is taken over the statistics tokens routed to it (divided by all tokens, so
lambda means what it means on a dense layer), the stacked second moment is taken block-diagonal (exact when
each token goes to one expert), and the Woodbury identity turns the stacked solve into one per expert plus
an [n, n] one. An expert that no edited key is routed to is left as it is.

The gate-weighted keys are read from the MoE layer itself, whatever its routing or expert kernels: y is
linear in the output projections, so with W_e set to rows of an identity (every other expert's to zero) the
layer outputs g_e k_e. E * inner / hidden such calls of the layer read every expert's keys.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from analysis.expert_gradients import block_shape, expert_output_weights, routed_only
from modeling.architecture import as_sequence, check_layers, decoder_blocks, mlp_output_modules
from modeling.expert_layers import expert_layers
from modeling.probe import StructureError


class KeyReader:
    """The keys of one edited layer in a forward pass of the model: [E, N, T, d], E = 1 on a dense path."""

    def __init__(self, model: nn.Module, layer: int) -> None:
        self.routed = routed_only(model)
        if self.routed:
            check_layers(model, [layer], "layers")
            block = decoder_blocks(model)[layer]
            moe_layers = expert_layers(block)
            if len(moe_layers) != 1:
                raise StructureError(f"MEMIT: block {layer} has {len(moe_layers)} MoE layers, not one")
            ((_, self.weights, self.transposed),) = expert_output_weights(model, [layer])
            self.module = block.get_submodule(moe_layers[0].path)
        else:
            ((_, self.module, self.transposed),) = mlp_output_modules(model, [layer])  # Conv1D: [in, out]
            self.weights = [self.module.weight]
        self._inputs: tuple[tuple[Any, ...], dict[str, Any]] | None = None

    @contextlib.contextmanager
    def watching(self) -> Iterator[None]:
        """Record the layer's input in the forward passes run inside."""
        handle = self.module.register_forward_pre_hook(
            lambda module, args, kwargs: setattr(self, "_inputs", (args, kwargs)), with_kwargs=True
        )
        try:
            yield
        finally:
            handle.remove()

    def keys(self, batch: int, length: int) -> torch.Tensor:
        """The keys of the last watched forward pass: [E, batch, length, d]."""
        args, kwargs = self._inputs
        if not self.routed:
            return as_sequence(args[0].detach(), batch, length).unsqueeze(0)
        with torch.no_grad():
            return self._routed_keys(args, kwargs, batch, length)

    def matrices(self) -> list[torch.Tensor]:
        """The edited weights as [out, in] views, one per expert (one on a dense path)."""
        if not self.routed:
            return [self.weights[0].T if self.transposed else self.weights[0]]
        if len(self.weights) > 1:  # modular experts
            return list(self.weights)
        fused = self.weights[0]
        return [fused[e].T if self.transposed else fused[e] for e in range(fused.shape[0])]

    def _routed_keys(self, args: tuple, kwargs: dict, batch: int, length: int) -> torch.Tensor:
        experts, out, inner = block_shape(self.weights, self.transposed)
        matrices, saved = self.matrices(), [w.detach().clone() for w in self.weights]

        def layer_output() -> torch.Tensor:  # bypasses hooks: [N, T, out] in float32
            output = self.module.forward(*args, **kwargs)
            return as_sequence(output[0] if isinstance(output, tuple) else output, batch, length).float()

        keys = torch.empty(experts, batch, length, inner)
        try:
            for weight in self.weights:
                weight.zero_()
            baseline = layer_output()  # whatever does not pass through the output projections (biases)
            for start in range(0, experts * inner, out):  # stacked key rows [start, start + out) per call
                spans = []
                for expert in range(start // inner, min(math.ceil((start + out) / inner), experts)):
                    first, last = max(start - expert * inner, 0), min(start + out - expert * inner, inner)
                    row, steps = expert * inner + first - start, torch.arange(last - first)
                    matrices[expert][row + steps, first + steps] = 1
                    spans.append((expert, first, last, row))
                probed = layer_output() - baseline
                for expert, first, last, row in spans:
                    keys[expert, ..., first:last] = probed[..., row : row + last - first]
                    matrices[expert].zero_()
        finally:
            for weight, original in zip(self.weights, saved, strict=True):
                weight.copy_(original)
        return keys


def expert_deltas(
    keys: torch.Tensor, residual: torch.Tensor, second_moments: torch.Tensor, weight: float, layer: int
) -> torch.Tensor:
    """dW_e = R M^-1 K_e^T (lambda C_e)^-1 with M = I + sum_f K_f^T (lambda C_f)^-1 K_f, for each expert e:
    MEMIT's dW = R K^T (lambda C + K K^T)^-1 for the stacked experts with C block-diagonal, in float64.
    keys [E, d, n], residual [out, n], second_moments [E, d, d]; returns [E, out, d]."""
    keys, residual = keys.double(), residual.double()
    scaled = torch.zeros_like(keys)  # (lambda C_e)^-1 K_e
    for expert in range(len(keys)):
        if keys[expert].any():  # zero for an expert no key is routed to
            try:
                scaled[expert] = torch.linalg.solve(weight * second_moments[expert].double(), keys[expert])
            except torch.linalg.LinAlgError as error:
                raise ValueError(
                    f"MEMIT: layer {layer} expert {expert}: the second moment of its keys is singular (the "
                    "statistics tokens routed to it do not span its key width); raise "
                    "analysis.memit.mom2_n_samples"
                ) from error
    coupling = torch.eye(keys.shape[2], dtype=torch.float64) + torch.einsum("edn,edm->nm", keys, scaled)
    coefficients = torch.linalg.solve(coupling, residual.T).T  # R M^-1 (M is symmetric): [out, n]
    return torch.einsum("on,edn->eod", coefficients, scaled)
