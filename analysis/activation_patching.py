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

from analysis.causal_inputs import Problem
from analysis.interventions import Interventions, heads_of
from stats.estimates import bootstrap


def target_log_prob(logits: torch.Tensor, prompt_length: int, target: torch.Tensor) -> torch.Tensor:
    """log P(target | prompt) of each row of `logits` [B, T, V]: [B]."""
    start = prompt_length - 1
    log_probs = logits[:, start : start + len(target)].float().log_softmax(-1)  # [B, A, V]
    return log_probs.gather(-1, target[None, :, None].expand(len(logits), -1, 1))[..., 0].sum(-1)


def patch_problem(hooks: Interventions, problem: Problem, batch_size: int) -> dict[str, Any]:
    """The clean and noisy target log-probs of one problem and, per site kind and layer, the noisy run's with
    the clean run's output patched in at the aligned prompt tokens."""
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
    for kind, modules in hooks.sites.items():
        heads = heads_of(hooks.model) if kind == "head" else 1
        units = [(layer, head) for layer in sorted(modules) for head in range(heads)]
        patched = []
        for start in range(0, len(units), batch_size):
            chunk = units[start : start + batch_size]
            edits = _patching(chunk, kind, heads, source, positions, recorded)
            logits = hooks.run(noisy_ids.repeat(len(chunk), 1), edits=edits)
            patched += target_log_prob(logits, len(problem.prompt_ids), target).tolist()
        names = [f"{layer}.{head}" if kind == "head" else str(layer) for layer, head in units]
        result["kinds"][kind] = {"units": names, "patched": patched}
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


def recovered_share(rows: list[dict[str, Any]], kind: str, index: int, settings: Any) -> dict[str, Any]:
    """The share of the clean-minus-noisy gap the patch of unit `index` of `kind` recovers, over problems:
    sum(patched - noisy) / sum(clean - noisy), with a percentile bootstrap interval over problems."""
    recovered = np.array([r["kinds"][kind]["patched"][index] - r["noisy"] for r in rows])
    gap = np.array([r["clean"] - r["noisy"] for r in rows])

    def share(picked: np.ndarray) -> float:
        total = gap[picked].sum()
        return float(recovered[picked].sum() / total) if total != 0 else float("nan")

    return bootstrap(share, len(rows), None, settings.resamples, settings.seed, settings.confidence).as_dict()
