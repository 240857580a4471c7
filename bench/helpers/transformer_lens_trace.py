"""Causal tracing written the TransformerLens way (transformer-lens 4.3, TransformerBridge over the same HF
model): one patched forward per (layer, token), each batching the noise draws as ROME's own loop does, with
the noise added at `hook_embed` and the clean state written back at `blocks.{l}.hook_resid_post` /
`hook_mlp_out` / `hook_attn_out`. The reference lmlab's batched trace (analysis/causal_trace.py) is pinned to
(tests/test_causal_parity.py) and timed against (bench/causal_trace.py)."""

from __future__ import annotations

import tempfile
from typing import Any

import torch
from transformers import AutoTokenizer

from analysis.causal_trace import Fact, answer_scores

HOOKS = {"block": "hook_resid_post", "mlp": "hook_mlp_out", "attention": "hook_attn_out"}


def bridge_of(model: torch.nn.Module, tokenizer: Any) -> Any:
    """A TransformerBridge over `model` (no download: the tokenizer is saved locally and reloaded, as the
    bridge reloads it by path)."""
    from transformer_lens.model_bridge import TransformerBridge

    directory = tempfile.mkdtemp()
    tokenizer.save_pretrained(directory)
    local = AutoTokenizer.from_pretrained(directory)
    return TransformerBridge.boot_transformers("local", hf_model=model, tokenizer=local, device="cpu")


def trace(
    bridge: Any,
    fact: Fact,
    level: float,
    samples: int,
    window: int,
    kinds: tuple[str, ...],
    generator: torch.Generator,
    layers: int,
) -> dict[str, dict[str, list[list[float]]]]:
    """Per site kind, the indirect effects of restoring each (layer, prompt token) on P(first answer token)
    (`effect`) and on log P(answer) (`log_prob_effect`): [layers, tokens] each."""
    ids = torch.tensor(fact.prompt_ids + fact.answer_ids)
    subject = torch.tensor(fact.subject)
    _, cache = bridge.run_with_cache(ids[None])
    hidden = cache["hook_embed"].shape[-1]
    draws = torch.randn(samples, len(fact.subject), hidden, generator=generator) * level
    batch = ids.repeat(samples, 1)

    def corrupt(value: torch.Tensor, hook: Any) -> torch.Tensor:
        value = value.clone()
        value[:, subject] += draws.to(value.dtype)
        return value

    def restore(name: str, token: int):
        def hook(value: torch.Tensor, hook: Any) -> torch.Tensor:
            value = value.clone()
            value[:, token] = cache[name][0, token]
            return value

        return hook

    with torch.no_grad():
        corrupted = answer_scores(bridge.run_with_hooks(batch, fwd_hooks=[("hook_embed", corrupt)]), fact)
        effects = {}
        for kind in kinds:
            span = 1 if kind == "block" else window
            grid: dict[str, list[list[float]]] = {"effect": [], "log_prob_effect": []}
            for layer in range(layers):
                low, high = max(0, layer - span // 2), min(layers, layer - (-span // 2))
                covered = range(low, high) if span > 1 else [layer]
                first, whole = [], []
                for token in range(len(fact.prompt_ids)):
                    hooks = [("hook_embed", corrupt)]
                    hooks += [
                        (f"blocks.{c}.{HOOKS[kind]}", restore(f"blocks.{c}.{HOOKS[kind]}", token))
                        for c in covered
                    ]
                    restored = answer_scores(bridge.run_with_hooks(batch, fwd_hooks=hooks), fact)
                    first.append(float(restored[0].mean() - corrupted[0].mean()))
                    whole.append(float(restored[1].mean() - corrupted[1].mean()))
                grid["effect"].append(first)
                grid["log_prob_effect"].append(whole)
            effects[kind] = grid
    return effects
