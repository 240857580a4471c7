"""Attention knockout (Geva et al. 2023, "Dissecting Recall of Factual Associations"): every position after
the injected noise is stopped from attending to the noise (NI) tokens, in a window of layers or in all of
them, by masking the attention scores inside the attention modules (analysis/interventions.py). A control
knocks out as many randomly chosen other-context (OC) tokens, so that "the noise hurts" is told from "removing
any tokens hurts". One batch holds the plain run, each window's knockout and each window's control.
"""

from __future__ import annotations

import random
from typing import Any

import torch

from analysis.causal_inputs import Problem, answer_token_log_probs
from analysis.intervened_generation import Greedy
from analysis.interventions import Interventions
from stats.estimates import paired, verdicts


def windows(layers: list[int], size: int) -> dict[str, list[int]]:
    """`all` the attention layers, then consecutive windows of `size` of them (0: none), named by range."""
    found = {"all": layers}
    for start in range(0, len(layers), size) if 0 < size < len(layers) else []:
        chunk = layers[start : start + size]
        found[f"{chunk[0]}-{chunk[-1]}"] = chunk
    return found


def edges(keys: list[int], after: int, length: int) -> torch.Tensor:
    """[length, length] True where a query at or after `after` would read one of `keys`."""
    blocked = torch.zeros(length, length, dtype=torch.bool)
    if keys:
        blocked[after:, keys] = True
    return blocked


def control_tokens(problem: Problem, count: int, seed: int) -> list[int]:
    """`count` random other-context tokens of the prompt (never the first, the attention sink, or the last),
    the same for the same problem and seed."""
    pool = [i for i in problem.tokens_of("OC") if 0 < i < len(problem.prompt_ids) - 1]
    return sorted(random.Random(f"{seed}|{problem.id}").sample(pool, min(count, len(pool))))


def knockout_problem(
    hooks: Interventions,
    problem: Problem,
    named_windows: dict[str, list[int]],
    seed: int,
    greedy: Greedy | None = None,
) -> dict[str, Any]:
    """The gold target's log-prob (and, with `greedy`, the generated token ids) of the plain run, each
    window's knockout of the noise tokens and each window's control."""
    noise = problem.tokens_of("NI")
    if not noise:
        raise ValueError(f"problem {problem.id}: no NI (noise) token to knock out; analyse a noisy task")
    control = control_tokens(problem, len(noise), seed)
    after = max(noise) + 1
    variants = ["plain"] + [f"{kind}/{name}" for kind in ("knockout", "control") for name in named_windows]

    def masks(length: int) -> dict[int, torch.Tensor]:
        noise_edges, control_edges = edges(noise, after, length), edges(control, after, length)
        per_layer: dict[int, torch.Tensor] = {}
        for row, variant in enumerate(variants[1:], 1):
            kind, name = variant.split("/")
            for layer in named_windows[name]:
                blocked = per_layer.setdefault(
                    layer, torch.zeros(len(variants), length, length, dtype=torch.bool)
                )
                blocked[row] = noise_edges if kind == "knockout" else control_edges
        return {layer: mask.to(hooks.model.device) for layer, mask in per_layer.items()}

    ids = torch.tensor(problem.prompt_ids + problem.target_ids, device=hooks.model.device)
    logits = hooks.run(ids.repeat(len(variants), 1), knockout=masks(len(ids)))
    target = ids[len(problem.prompt_ids) :]
    scores = answer_token_log_probs(logits, len(problem.prompt_ids), target).sum(-1)  # [variants]
    result = {
        "id": problem.id,
        "noise_tokens": noise,
        "control_tokens": control,
        "log_prob": dict(zip(variants, scores.tolist(), strict=True)),
    }
    if greedy is not None:
        blocked = masks(len(problem.prompt_ids) + greedy.max_new_tokens)
        generated = greedy.run(hooks, problem.prompt_ids, len(variants), {"knockout": blocked})
        result["generated"] = dict(zip(variants, generated, strict=True))
    return result


def summarise(rows: list[dict[str, Any]], confidence: float) -> dict[str, Any]:
    """Per window: the knockout and the control against the plain run and against each other, paired per
    problem (log-prob: paired t; Pass@1: exact McNemar), with Holm across the table's comparisons."""
    names = [v.split("/", 1)[1] for v in rows[0]["log_prob"] if v.startswith("knockout/")]
    tables = {}
    for metric in ("log_prob", "correct"):
        if metric not in rows[0] or len(rows) < 2:
            continue
        pairs = [
            (a, b, window)
            for window in names
            for a, b in (
                (f"knockout/{window}", "plain"),
                (f"control/{window}", "plain"),
                (f"knockout/{window}", f"control/{window}"),
            )
        ]
        comparisons = [
            paired([r[metric][a] for r in rows], [r[metric][b] for r in rows], None, confidence)
            for a, b, _ in pairs
        ]
        judged = verdicts(comparisons, [(a, b) for a, b, _ in pairs], better="higher")
        tables[metric] = [
            {"a": a, "b": b, "window": window, **comparison.as_dict(), **verdict}
            for (a, b, window), comparison, verdict in zip(pairs, comparisons, judged, strict=True)
        ]
    return tables
