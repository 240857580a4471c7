"""Attention maps of any causal LM on any text: forward hooks on every attention module, and `attention_maps`,
the function notebooks call.

    from analysis.attention_maps import attention_maps
    [maps] = attention_maps(model, tokenizer, ["Tom has 3 apples and eats 1."], layers=[0, -1], heads=[0, 1])
    maps.tokens                 # the token strings, in order
    maps.maps["standard"]       # [layers, heads, T, T] (DiffLlama: maps.maps["diff"], the differential map)

The model runs with eager attention (the only implementation that returns the weights). The hooks keep only
the rows and keys asked for, so a layer's full [B, H, T, T] map is dropped as soon as the layer is done.

DiffLlama (transformers' `DiffLlamaAttention`, checked against the installed source): one softmax map
A = softmax(QK^T * scale) of shape [B, H, T, T] is computed and returned (both attention calls share
Q and K; V is split into two halves along the KV heads, each tiled back to all KV heads, and the two
outputs are concatenated along the feature axis, [B, T, H, 2*head_dim]). The outputs are then chunked
along the head axis into the first and second halves and combined as out[h] - lambda_full * out[h + H/2]
for h < H/2, with lambda_full = exp(sum(lambda_q1 * lambda_k1)) - exp(sum(lambda_q2 * lambda_k2)) +
lambda_init and lambda_init = 0.8 - 0.6 * exp(-0.3 * layer_idx); heads h and h + H/2 read the same
value vectors, so this equals (A[:, h] - lambda_full * A[:, h + H/2]) @ V_pair(h): the differential map
of head h. The layer then applies an RMSNorm over 2*head_dim (no affine) per head and scales by
(1 - lambda_init). The analysed map is the differential one (H/2 heads), `diff`; `a1` (heads 0..H/2-1) and
`a2` (heads H/2..H-1) are its raw halves. Other models have one map, `standard`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from lightning_modules.architecture import attention_modules


def differential_maps(module: torch.nn.Module, weights: torch.Tensor, maps: list[str]) -> dict[str, torch.Tensor]:
    """Named maps of one layer: `standard` for ordinary attention; `diff`, `a1`, `a2` for DiffLlama."""
    if not hasattr(module, "lambda_q1"):
        return {"standard": weights}
    half = weights.shape[1] // 2
    lambda_1 = torch.exp(torch.sum(module.lambda_q1 * module.lambda_k1, dtype=torch.float32))
    lambda_2 = torch.exp(torch.sum(module.lambda_q2 * module.lambda_k2, dtype=torch.float32))
    lambda_full = lambda_1 - lambda_2 + module.lambda_init
    named = {"diff": weights[:, :half] - lambda_full * weights[:, half:], "a1": weights[:, :half], "a2": weights[:, half:]}
    return {name: named[name] for name in maps}


class AttentionCapture:
    """Forward hooks that keep rows `queries` x keys [0, keys) of every layer's map(s): [layer] -> {map: [H, Q, K]}."""

    def __init__(self, model: torch.nn.Module, maps: list[str]) -> None:
        self.maps, self.layers, self.active = maps, [], False
        self.queries: list[int] = []
        self.keys = 0
        self.handles = [m.register_forward_hook(self._hook) for m in attention_modules(model)]
        if not self.handles:
            raise ValueError(f"{type(model).__name__}: no attention modules found")

    def _hook(self, module: torch.nn.Module, args: Any, output: tuple) -> None:
        if not self.active:  # e.g. the model.generate calls that produce the generated query tokens
            return
        weights = output[1]
        if weights is None:
            raise RuntimeError("attention weights are None: the model must run with attn_implementation='eager'")
        rows = weights[:, :, self.queries, : self.keys].float()  # [1, H, Q, K]
        self.layers.append({k: v[0].detach().cpu() for k, v in differential_maps(module, rows, self.maps).items()})

    def run(self, model: torch.nn.Module, input_ids: torch.Tensor, queries: list[int], keys: int) -> list[dict]:
        """Per-layer captured maps of one forward pass."""
        self.layers, self.queries, self.keys, self.active = [], queries, keys, True
        try:
            with torch.no_grad():
                model(input_ids=input_ids)
        finally:
            self.active = False
        return self.layers

    def remove(self) -> None:
        """Detach the hooks."""
        for handle in self.handles:
            handle.remove()


@dataclass
class TextMaps:
    """The attention maps of one text: `maps[name]` is [layers, heads, T, T] for the chosen layers and heads."""

    text: str
    tokens: list[str]
    layers: list[int]
    heads: list[int]
    maps: dict[str, torch.Tensor]
    num_layers: int  # the model's, of which `layers` were chosen
    num_heads: int  # the map's, of which `heads` were chosen


def select(indices: list[int] | None, size: int, what: str) -> list[int]:
    """`indices` (negative ones count from the end; None: all) as positions in range(size)."""
    if indices is None:
        return list(range(size))
    bad = [i for i in indices if not -size <= i < size]
    if bad:
        raise ValueError(f"{what} {bad} out of range: the model has {size} {what}")
    return [i % size for i in indices]


def token_strings(tokenizer: Any, input_ids: list[int]) -> list[str]:
    """Each token as the text it stands for (readable labels, unlike byte-level token names)."""
    return [tokenizer.decode([token]) for token in input_ids]


def attention_maps(model: torch.nn.Module, tokenizer: Any, texts: str | list[str], layers: list[int] | None = None,
                   heads: list[int] | None = None, maps: tuple[str, ...] = ("diff",)) -> list[TextMaps]:
    """The full attention maps of each text ([layers, heads, T, T] per map name) with its token strings, for the
    chosen `layers` and `heads` (None: all; negative indices count from the end). `maps` picks DiffLlama's
    maps (`diff`, `a1`, `a2`); other models give `standard`. Switches the model to eager attention, eval mode."""
    model.set_attn_implementation("eager")
    model.eval()
    capture = AttentionCapture(model, list(maps))
    results = []
    try:
        for text in [texts] if isinstance(texts, str) else texts:
            input_ids = tokenizer(text, return_tensors="pt")["input_ids"]  # [1, T]
            length = input_ids.shape[1]
            captured = capture.run(model, input_ids.to(model.device), list(range(length)), length)
            chosen_layers = select(layers, len(captured), "layers")
            stacked = {name: torch.stack([captured[i][name] for i in chosen_layers]) for name in captured[0]}  # [L, H, T, T]
            num_heads = next(iter(stacked.values())).shape[1]
            chosen_heads = select(heads, num_heads, "heads")
            results.append(TextMaps(text, token_strings(tokenizer, input_ids[0].tolist()), chosen_layers, chosen_heads,
                                    {name: values[:, chosen_heads].contiguous() for name, values in stacked.items()},
                                    len(captured), num_heads))
    finally:
        capture.remove()
    return results
