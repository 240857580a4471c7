"""Attention maps of any causal LM on any text: forward hooks on every attention module, and `attention_maps`,
the function notebooks call.

    from analysis.attention_maps import attention_maps
    [maps] = attention_maps(model, tokenizer, ["Tom has 3 apples and eats 1."], layers=[0, -1], heads=[0, 1])
    maps.tokens                 # the token strings, in order
    maps.maps["standard"]       # [layers, heads, T, T] (DiffLlama: maps.maps["diff"], the differential map)

The maps are taken where the attention computes them, whatever the model's code: while a block's attention
module runs, a torch function mode watches its calls, and the attention weights are the output of its softmax
over the keys, or, where it calls `scaled_dot_product_attention` (which never returns them), softmax(QK^T *
scale + mask) computed from the same q, k, mask and scale (grouped kv heads repeated as sdpa does). The
attention modules are found in the model (modeling/architecture.py), so remote-code models that never
return weights are analysed like transformers' own; models whose attention implementation can be chosen run
with eager attention. The hooks keep only the rows and keys asked for, so a layer's full [B, H, T, T] map is
dropped as soon as the layer is done.

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
from torch.overrides import TorchFunctionMode

from modeling.architecture import attention_modules
from modeling.discovery import StructureError


def differential_maps(
    module: torch.nn.Module, weights: torch.Tensor, maps: list[str]
) -> dict[str, torch.Tensor]:
    """Named maps of one layer: `standard` for ordinary attention; `diff`, `a1`, `a2` for DiffLlama."""
    if not hasattr(module, "lambda_q1"):
        return {"standard": weights}
    half = weights.shape[1] // 2
    lambda_1 = torch.exp(torch.sum(module.lambda_q1 * module.lambda_k1, dtype=torch.float32))
    lambda_2 = torch.exp(torch.sum(module.lambda_q2 * module.lambda_k2, dtype=torch.float32))
    lambda_full = lambda_1 - lambda_2 + module.lambda_init
    named = {
        "diff": weights[:, :half] - lambda_full * weights[:, half:],
        "a1": weights[:, :half],
        "a2": weights[:, half:],
    }
    return {name: named[name] for name in maps}


SOFTMAXES = (torch.softmax, torch.nn.functional.softmax, torch.Tensor.softmax)


def sdpa_weights(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
) -> torch.Tensor:
    """The weights [B, H, L, S] that `scaled_dot_product_attention` applies to `value` for these arguments
    (float32)."""
    query, key = query.float(), key.float()
    if key.shape[-3] != query.shape[-3]:  # grouped kv heads serve consecutive query heads
        key = key.repeat_interleave(query.shape[-3] // key.shape[-3], dim=-3)
    # [B, H, L, S]
    scores = query @ key.transpose(-2, -1) * (query.shape[-1] ** -0.5 if scale is None else scale)
    if is_causal:
        allowed = torch.ones(scores.shape[-2:], dtype=torch.bool, device=scores.device).tril()
        scores = scores.masked_fill(~allowed, float("-inf"))
    if attn_mask is not None:
        scores = (
            scores.masked_fill(~attn_mask, float("-inf"))
            if attn_mask.dtype == torch.bool
            else scores + attn_mask
        )
    return scores.softmax(-1)


class _WeightProbe(TorchFunctionMode):
    """Active inside one attention call: records the attention weights of its softmax or sdpa calls."""

    def __init__(self) -> None:
        super().__init__()
        self.found: list[torch.Tensor] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        result = func(*args, **kwargs)
        if func is torch.nn.functional.scaled_dot_product_attention:
            self.found.append(sdpa_weights(*args, **kwargs))
        elif func in SOFTMAXES and isinstance(result, torch.Tensor) and result.dim() == 4:
            dim = kwargs.get("dim", args[1] if len(args) > 1 else None)
            if dim in (-1, 3):
                self.found.append(result)
        return result


class AttentionCapture:
    """Hooks on every attention module that keep rows `queries` x keys [0, keys) of its map(s):
    [layer] -> {map: [H, Q, K]}."""

    def __init__(self, model: torch.nn.Module, maps: list[str]) -> None:
        self.maps, self.layers, self.active = maps, [], False
        self.queries: list[int] = []
        self.keys = 0
        self.probe: _WeightProbe | None = None
        modules = attention_modules(model)
        if not modules:
            raise ValueError(f"{type(model).__name__}: no attention modules found")
        self.handles = [
            handle
            for m in modules
            for handle in (m.register_forward_pre_hook(self._enter), m.register_forward_hook(self._leave))
        ]

    def _enter(self, module: torch.nn.Module, args: Any) -> None:
        if self.active:  # not during e.g. the model.generate calls that produce the generated query tokens
            self.probe = _WeightProbe()
            self.probe.__enter__()

    def _leave(self, module: torch.nn.Module, args: Any, output: Any) -> None:
        if self.probe is None:
            return
        probe, self.probe = self.probe, None
        probe.__exit__(None, None, None)
        distinct = [
            w for i, w in enumerate(probe.found) if not any(torch.equal(w, v) for v in probe.found[:i])
        ]
        if len(distinct) != 1:
            raise RuntimeError(
                f"{type(module).__name__}: expected one attention map per call (a softmax over the keys "
                f"or a scaled_dot_product_attention call), saw {len(distinct)}"
            )
        rows = distinct[0][:, :, self.queries, : self.keys].float()  # [1, H, Q, K]
        self.layers.append(
            {k: v[0].detach().cpu() for k, v in differential_maps(module, rows, self.maps).items()}
        )

    def run(
        self, model: torch.nn.Module, input_ids: torch.Tensor, queries: list[int], keys: int
    ) -> list[dict]:
        """Per-layer captured maps of one forward pass."""
        self.layers, self.queries, self.keys, self.active = [], queries, keys, True
        try:
            with torch.no_grad():
                model(input_ids=input_ids)
        finally:
            self.active = False
            if self.probe is not None:  # the forward failed inside an attention module
                self.probe.__exit__(None, None, None)
                self.probe = None
        return self.layers

    def remove(self) -> None:
        """Detach the hooks."""
        for handle in self.handles:
            handle.remove()


def prefer_eager(model: torch.nn.Module) -> None:
    """Eager attention where the model lets its implementation be chosen (remote code often ignores the
    choice; its own attention is then watched as it is), and eval mode."""
    model.set_attn_implementation("eager")
    model.eval()


@dataclass
class TextMaps:
    """The attention maps of one text: `maps[name]` is [layers, heads, T, T] for the chosen layers and
    heads."""

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
        noun = what.rsplit(".", 1)[-1]
        raise StructureError(
            f"{what}={list(indices)}: {bad} out of range; the model has {size} {noun} (0..{size - 1}, or "
            f"-1..-{size})"
        )
    return [i % size for i in indices]


def token_strings(tokenizer: Any, input_ids: list[int]) -> list[str]:
    """Each token as the text it stands for (readable labels, unlike byte-level token names)."""
    return [tokenizer.decode([token]) for token in input_ids]


def attention_maps(
    model: torch.nn.Module,
    tokenizer: Any,
    texts: str | list[str],
    layers: list[int] | None = None,
    heads: list[int] | None = None,
    maps: tuple[str, ...] = ("diff",),
) -> list[TextMaps]:
    """The full attention maps of each text ([layers, heads, T, T] per map name) with its token strings, for
    the chosen `layers` and `heads` (None: all; negative indices count from the end). `maps` picks DiffLlama's
    maps (`diff`, `a1`, `a2`); other models give `standard`. Switches the model to eager attention, eval
    mode."""
    prefer_eager(model)
    capture = AttentionCapture(model, list(maps))
    results = []
    try:
        for text in [texts] if isinstance(texts, str) else texts:
            input_ids = tokenizer(text, return_tensors="pt")["input_ids"]  # [1, T]
            length = input_ids.shape[1]
            captured = capture.run(model, input_ids.to(model.device), list(range(length)), length)
            chosen_layers = select(layers, len(captured), "layers")
            stacked = {
                name: torch.stack([captured[i][name] for i in chosen_layers]) for name in captured[0]
            }  # [L, H, T, T]
            num_heads = next(iter(stacked.values())).shape[1]
            chosen_heads = select(heads, num_heads, "heads")
            results.append(
                TextMaps(
                    text,
                    token_strings(tokenizer, input_ids[0].tolist()),
                    chosen_layers,
                    chosen_heads,
                    {name: values[:, chosen_heads].contiguous() for name, values in stacked.items()},
                    len(captured),
                    num_heads,
                )
            )
    finally:
        capture.remove()
    return results
