"""The intervention layer the causal analyses share (analysis/causal.py): read a site's activations, overwrite
them in chosen batch rows and positions, add noise to input embeddings, and knock out attention edges.

Every intervention is a plain PyTorch hook on a site found in the model (analysis/sites.py), so it reaches
any decoder the discovery handles (transformers' families, mixtures, hybrids, remote code), with no
per-family code. A batch holds variants of one sequence (one row per restored site, per noise draw, per
knockout), so many interventions run in one forward pass; an edit of a `head` site may write some columns
(one head's slice) and keep the rest.

Why hooks rather than nnsight or pyvene (docs/causal.md): both wrap the model in their own tracing or
configuration objects and address modules by name or type, while lmlab already finds every site by structure;
the hooks add no dependency and no per-call overhead, and batch any set of (row, position) edits per layer.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from analysis.attention_maps import SOFTMAXES
from analysis.sites import INPUT_KINDS, Edits, Site, hidden_of, site_modules, with_hidden
from modeling.architecture import input_embeddings
from modeling.discovery import StructureError


class Interventions:
    """Hooks on a model's sites, embeddings and attention, active inside `run`: each forward can record
    sites, overwrite them, add noise to the input embeddings and knock out attention edges."""

    def __init__(self, model: nn.Module, kinds: tuple[str, ...] = ("block",), knockout: bool = False) -> None:
        self.model = model
        self.sites = {kind: site_modules(model, kind) for kind in kinds}
        self.attention = site_modules(model, "attention") if knockout else {}
        self.record: set[Site] = set()
        self.recorded: dict[Site, torch.Tensor] = {}
        self.edits: Edits = {}
        self.noise: tuple[torch.Tensor, torch.Tensor] | None = None
        self.knockout: Mapping[int, torch.Tensor] = {}
        self.shape = (0, 0)
        self._mode: _Knockout | None = None  # the knockout of the attention call running now

    @contextmanager
    def hooked(self) -> Iterator[Interventions]:
        """The hooks attached for the duration of the block."""
        handles = [input_embeddings(self.model).register_forward_hook(self._embed)]
        for kind, modules in self.sites.items():
            for layer, module in modules.items():
                if kind in INPUT_KINDS:
                    handles.append(module.register_forward_pre_hook(self._input_hook((kind, layer))))
                else:
                    handles.append(module.register_forward_hook(self._site_hook((kind, layer))))
        for layer, module in self.attention.items():
            # entered last and left first: inside any other watcher of the attention call (the maps' capture)
            handles += [
                module.register_forward_pre_hook(self._knockout_enter(layer)),
                module.register_forward_hook(self._knockout_leave, prepend=True),
            ]
        try:
            yield self
        finally:
            for handle in handles:
                handle.remove()

    def run(
        self,
        input_ids: torch.Tensor,
        record: set[Site] | None = None,
        edits: Edits | None = None,
        noise: tuple[torch.Tensor, torch.Tensor] | None = None,
        knockout: Mapping[int, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """The logits [B, T, V] of the input tokens in one forward pass of `input_ids` [B, T] that records the
        sites in `record` (then in `recorded`, [B, T, d] each), writes `edits`, adds `noise` = (positions [S],
        values [B, S, d]) to the input embeddings, and blocks attention in layer l where `knockout[l]`
        [B, T', T'] (query, key; T' >= T) is True."""
        self.record, self.recorded = record or set(), {}
        self.edits, self.noise, self.knockout = edits or {}, noise, knockout or {}
        self.shape = tuple(input_ids.shape)
        try:
            with torch.no_grad():
                return self.model(input_ids=input_ids).logits[:, -input_ids.shape[1] :]
        finally:
            self.edits, self.noise, self.knockout = {}, None, {}
            if self._mode is not None:  # the forward failed inside an attention module
                self._mode.__exit__(None, None, None)
                self._mode = None

    def _embed(self, module: nn.Module, args: Any, output: torch.Tensor) -> torch.Tensor | None:
        if self.noise is None:
            return None
        positions, values = self.noise
        output = output.clone()
        output[:, positions] += values.to(output.dtype)
        return output

    def _site_hook(self, site: Site) -> Callable[..., Any]:
        def hook(module: nn.Module, args: Any, output: Any) -> Any:
            edited = self._visit(site, output)
            return None if edited is None else with_hidden(output, edited)

        return hook

    def _input_hook(self, site: Site) -> Callable[..., Any]:
        def hook(module: nn.Module, args: Any) -> Any:
            edited = self._visit(site, args)
            return None if edited is None else with_hidden(args, edited)

        return hook

    def _visit(self, site: Site, value: Any) -> torch.Tensor | None:
        """Record the hidden states in `value` where asked; the edited states [B, T', d], or None. Positions
        count the input tokens: a prompt-tuned model's virtual tokens, which it puts first, are skipped."""
        if site not in self.record and site not in self.edits:
            return None
        hidden = hidden_of(value, self.shape[0])
        virtual = hidden.shape[1] - self.shape[1]
        if site in self.record:
            self.recorded[site] = hidden[:, virtual:].detach().clone()
        if site not in self.edits:
            return None
        rows, positions, values, *columns = self.edits[site]
        positions = positions + virtual
        hidden = hidden.clone()
        values = values.to(hidden.dtype)
        if columns:  # only these columns of each written cell
            values = torch.where(columns[0], values, hidden[rows, positions])
        hidden[rows, positions] = values
        return hidden

    def _knockout_enter(self, layer: int) -> Callable[..., None]:
        def hook(module: nn.Module, args: Any) -> None:
            if layer in self.knockout:
                self._mode = _Knockout(self.knockout[layer], type(module).__name__, self.shape[1])
                self._mode.__enter__()

        return hook

    def _knockout_leave(self, module: nn.Module, args: Any, output: Any) -> None:
        if self._mode is not None:
            mode, self._mode = self._mode, None
            mode.__exit__(None, None, None)
            if not mode.masked and mode.blocked.any():
                raise StructureError(
                    f"{mode.module}: attention knockout saw no softmax over keys and no "
                    "scaled_dot_product_attention call to mask (an attention kernel lmlab cannot reach)"
                )


class _Knockout(TorchFunctionMode):
    """Active inside one attention call over `length` input tokens: blocks the (query, key) pairs of `blocked`
    [B, T', T'] (token positions) in the scores of its softmax over keys, or in the mask of its
    scaled_dot_product_attention call."""

    def __init__(self, blocked: torch.Tensor, module: str, length: int) -> None:
        super().__init__()
        self.blocked, self.module, self.length, self.masked = blocked, module, length, False

    def _pairs(self, queries: int, keys: int) -> torch.Tensor:
        # keys beyond the input tokens are a prompt-tuned model's virtual tokens, first and never blocked;
        # the queries are the last `queries` of the keys (a KV cache puts earlier keys first)
        virtual = max(0, keys - self.length)
        blocked = self.blocked[:, : keys - virtual, : keys - virtual]
        blocked = torch.nn.functional.pad(blocked, (virtual, 0, virtual, 0))
        return blocked[:, keys - queries : keys][:, None]  # [B, 1, Q, K]

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if func is torch.nn.functional.scaled_dot_product_attention:
            self.masked = True
            if self.blocked.any():  # a knockout of no pair leaves the call as it was
                args, kwargs = _masked_sdpa(args, kwargs, self._pairs)
        elif func in SOFTMAXES and args and isinstance(args[0], torch.Tensor) and args[0].dim() == 4:
            dim = kwargs.get("dim", args[1] if len(args) > 1 else None)
            if dim in (-1, 3) and self.blocked.any():
                self.masked = True
                scores = args[0]
                blocked = self._pairs(scores.shape[-2], scores.shape[-1]).to(scores.device)
                args = (scores.masked_fill(blocked, torch.finfo(scores.dtype).min), *args[1:])
        return func(*args, **kwargs)


def _masked_sdpa(
    args: tuple, kwargs: dict[str, Any], pairs: Callable[[int, int], torch.Tensor]
) -> tuple[tuple, dict[str, Any]]:
    """scaled_dot_product_attention's arguments with the blocked pairs added to its mask (causality made
    explicit, as the call may not combine `is_causal` with a mask)."""
    names = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale")
    bound = dict(zip(names, args, strict=False)) | kwargs
    query, key = bound["query"], bound["key"]
    queries, keys = query.shape[-2], key.shape[-2]
    blocked = pairs(queries, keys).to(query.device)
    mask = bound.get("attn_mask")
    if bound.get("is_causal"):
        causal = torch.ones(queries, keys, dtype=torch.bool, device=query.device).tril()
        mask = causal if mask is None else mask & causal if mask.dtype == torch.bool else mask
        bound["is_causal"] = False
    if mask is None or mask.dtype == torch.bool:
        allowed = torch.ones_like(blocked) if mask is None else mask
        bound["attn_mask"] = allowed & ~blocked
    else:
        bound["attn_mask"] = mask.masked_fill(blocked, torch.finfo(mask.dtype).min)
    return (), bound
