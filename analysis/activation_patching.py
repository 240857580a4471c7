"""Activation patching, clean into noisy: a problem's clean prompt and its noisy prompt (the same question
with the injected noise) share every token outside the noise, aligned by their characters
(analysis/token_spans.py). The clean run's output of one site kind at one layer (for `head`, one head's slice
of the attention output projection's input) is written into the noisy run at every aligned prompt token, one
layer (or head) per batch row; the share of the clean-minus-noisy gap in the gold
target's log-probability (teacher-forced) that a layer recovers says where the noise does its damage.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from analysis.causal_inputs import Problem, answer_token_log_probs
from analysis.intervened_generation import Greedy
from analysis.interventions import Interventions
from analysis.sites import heads_of
from stats.estimates import bootstrap, paired, verdicts


def target_log_prob(logits: torch.Tensor, prompt_length: int, target: torch.Tensor) -> torch.Tensor:
    """log P(target | prompt) of each row of `logits` [B, T, V]: [B]."""
    return answer_token_log_probs(logits, prompt_length, target).sum(-1)


def patch_problem(
    hooks: Interventions, problem: Problem, batch_size: int, greedy: Greedy | None = None
) -> dict[str, Any]:
    """The clean and noisy target log-probs of one problem and, per site kind and layer, the noisy run's with
    the clean run's output patched in at the aligned prompt tokens; with `greedy`, the generated token ids of
    the clean, the noisy and every patched run (heads: log-probs only, a generation per head being too
    dear)."""
    if problem.clean_ids is None or problem.aligned is None:
        raise ValueError(f"problem {problem.id}: no clean prompt to patch from")
    device = hooks.model.device
    target = torch.tensor(problem.target_ids, device=device)
    clean_ids = torch.tensor(problem.clean_ids + problem.target_ids, device=device)
    noisy_ids = torch.tensor(problem.prompt_ids + problem.target_ids, device=device)
    sites = {(kind, layer) for kind, modules in hooks.sites.items() for layer in modules}
    clean = target_log_prob(hooks.run(clean_ids[None], record=sites), len(problem.clean_ids), target)
    recorded = {site: value[0] for site, value in hooks.recorded.items()}  # [T, d] each
    noisy = target_log_prob(hooks.run(noisy_ids[None]), len(problem.prompt_ids), target)
    source = torch.tensor([i for i, _ in problem.aligned], device=device)
    positions = torch.tensor([j for _, j in problem.aligned], device=device)
    result = {
        "id": problem.id,
        "clean": float(clean),
        "noisy": float(noisy),
        "aligned": len(source),
        "kinds": {},
    }
    generated: dict[str, Any] = {}
    if greedy is not None:
        generated["clean"] = greedy.run(hooks, problem.clean_ids, 1, {})[0]
        generated["noisy"] = greedy.run(hooks, problem.prompt_ids, 1, {})[0]
    for kind, modules in hooks.sites.items():
        heads = heads_of(hooks.model) if kind == "head" else 1
        units = [(layer, head) for layer in sorted(modules) for head in range(heads)]
        patched = []
        for start in range(0, len(units), batch_size):
            chunk = units[start : start + batch_size]
            edits = _patching(chunk, kind, heads, source, positions, recorded)
            logits = hooks.run(noisy_ids.repeat(len(chunk), 1), edits=edits)
            patched += target_log_prob(logits, len(problem.prompt_ids), target).tolist()
            if greedy is not None and kind != "head":
                generated.setdefault(kind, []).extend(
                    greedy.run(hooks, problem.prompt_ids, len(chunk), {"edits": edits})
                )
        names = [f"{layer}.{head}" if kind == "head" else str(layer) for layer, head in units]
        result["kinds"][kind] = {"units": names, "patched": patched}
    if generated:
        result["generated"] = generated
    return result


def _patching(
    chunk: list[tuple[int, int]],
    kind: str,
    heads: int,
    source: torch.Tensor,
    positions: torch.Tensor,
    recorded: dict[tuple[str, int], torch.Tensor],
) -> dict[tuple[str, int], tuple[torch.Tensor, ...]]:
    """Per site, the edits of a chunk of (layer, head) units, row i patching unit i at every aligned token
    (a head: only its slice of the columns)."""
    grouped: dict[int, list[tuple[int, int]]] = {}
    for row, (layer, head) in enumerate(chunk):
        grouped.setdefault(layer, []).append((row, head))
    edits = {}
    for layer, members in grouped.items():
        clean = recorded[(kind, layer)][source]  # [aligned, d]
        rows = torch.tensor([row for row, _ in members], device=clean.device).repeat_interleave(len(source))
        values = clean.repeat(len(members), 1)  # [members x aligned, d]
        site = (kind, layer)
        if kind != "head":
            edits[site] = (rows, positions.repeat(len(members)), values)
            continue
        width = values.shape[-1] // heads
        columns = torch.zeros(len(members), values.shape[-1], dtype=torch.bool, device=clean.device)
        for i, (_, head) in enumerate(members):
            columns[i, head * width : (head + 1) * width] = True
        edits[site] = (
            rows,
            positions.repeat(len(members)),
            values,
            columns.repeat_interleave(len(source), 0),
        )
    return edits


def pass_at_1_table(rows: list[dict[str, Any]], confidence: float) -> list[dict[str, Any]]:
    """Pass@1 of the clean prompts and of each patched unit against the noisy prompts, paired per problem
    (exact McNemar), Holm-adjusted across the table."""
    noisy = [r["correct"]["noisy"] for r in rows]
    pairs = [("clean", [r["correct"]["clean"] for r in rows])]
    for kind, entry in rows[0]["kinds"].items():
        if kind in rows[0]["correct"]:
            pairs += [
                (f"{kind} {unit}", [r["correct"][kind][i] for r in rows])
                for i, unit in enumerate(entry["units"])
            ]
    comparisons = [paired(values, noisy, None, confidence) for _, values in pairs]
    judged = verdicts(comparisons, [(name, "noisy") for name, _ in pairs], better="higher")
    return [
        {"a": name, "b": "noisy", **comparison.as_dict(), **verdict}
        for (name, _), comparison, verdict in zip(pairs, comparisons, judged, strict=True)
    ]


def recovered_share(rows: list[dict[str, Any]], kind: str, index: int, settings: Any) -> dict[str, Any]:
    """The share of the clean-minus-noisy gap the patch of unit `index` of `kind` recovers, over problems:
    sum(patched - noisy) / sum(clean - noisy), with a percentile bootstrap interval over problems."""
    recovered = np.array([r["kinds"][kind]["patched"][index] - r["noisy"] for r in rows])
    gap = np.array([r["clean"] - r["noisy"] for r in rows])

    def share(picked: np.ndarray) -> float:
        total = gap[picked].sum()
        return float(recovered[picked].sum() / total) if total != 0 else float("nan")

    return bootstrap(share, len(rows), None, settings.resamples, settings.seed, settings.confidence).as_dict()
