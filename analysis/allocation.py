"""KMI / NI / OC allocation: which token class (key math information, noise, other context) the attention of a
head gives its weight to, per problem, and the summary over problems with an interval."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig

from datamodules.gsm8k import GSM8KTask
from stats import estimates

CLASSES = GSM8KTask.attention_classes  # KMI, NI, OC: the noise study's allocation table


def token_classes(
    offsets: list[tuple[int, int]],
    spans: list[tuple[int, int, str]],
    text: str,
    classes: tuple[str, ...] = CLASSES,
) -> list[str]:
    """Class of each token from character spans (majority of non-whitespace characters, ties to the class
    listed first; characters outside every span get the last class)."""
    char_class = [classes[-1]] * len(text)
    for first, last, label in spans:
        char_class[first:last] = [label] * (last - first)
    labels = []
    for first, last in offsets:
        chars = [i for i in range(first, last) if not text[i].isspace()] or list(range(first, last))
        counts = {c: sum(char_class[i] == c for i in chars) for c in classes}
        labels.append(min(classes, key=lambda c: (-counts[c], classes.index(c))))
    return labels


def allocation(
    rows: torch.Tensor, labels: list[str], keep_sink: bool, classes: tuple[str, ...] = CLASSES
) -> tuple[np.ndarray, np.ndarray]:
    """Ratios and normalised scores [H, C] of query rows [H, Q, K] (key t of class labels[t]), averaged over
    queries."""
    included = torch.ones(len(labels), dtype=torch.bool)
    if not keep_sink:
        included[0] = False
    masks = torch.stack([torch.tensor([c == name for c in labels]) & included for name in classes])  # [C, K]
    mass = torch.einsum("hqk,ck->hqc", rows, masks.float())  # [H, Q, C]
    ratios = (mass / mass.sum(-1, keepdim=True)).mean(1)  # [H, C]
    share = masks.sum(-1).float() / included.sum()
    scores = torch.where(share > 0, ratios / share.clamp_min(1e-12), torch.full_like(ratios, float("nan")))
    return ratios.numpy(), scores.numpy()


def summarise(
    per_problem: dict[str, list[np.ndarray]], settings: DictConfig, classes: tuple[str, ...] = CLASSES
) -> dict[str, Any]:
    """Mean/std over problems of the ratios and normalised scores, the mean with its interval over problems
    (`low`, `high`, `n`: stats/estimates.py at `settings`): overall, per layer and per head, per map
    (`kmi_vs_ni`: KMI and NI scores and their ratio, for the GSM8K noise classes)."""
    summary: dict[str, Any] = {}
    for key, values in per_problem.items():
        name, kind = key.split("/")
        stacked = np.stack(values)  # [N, L, H, C]
        overall = np.nanmean(stacked, axis=(1, 2))  # [N, C]
        entry = summary.setdefault(name, {})
        entry[kind] = {
            c: {
                "mean": _float(np.nanmean(overall[:, i])),
                "std": _float(np.nanstd(overall[:, i])),
                **_interval(overall[:, i], settings),
                "per_layer": [_float(v) for v in np.nanmean(stacked[..., i], axis=(0, 2))],
                "per_head": [[_float(v) for v in row] for row in np.nanmean(stacked[..., i], axis=0)],
            }
            for i, c in enumerate(classes)
        }
    if {"KMI", "NI"} <= set(classes):
        for entry in summary.values():
            kmi, ni = entry["score"]["KMI"]["mean"], entry["score"]["NI"]["mean"]
            entry["kmi_vs_ni"] = {"kmi_score": kmi, "ni_score": ni, "kmi_to_ni": kmi / ni if ni else None}
    return summary


def _interval(values: np.ndarray, settings: DictConfig) -> dict[str, Any]:
    """`low`, `high`, `n` and `method` of the mean of the problems' finite values."""
    finite = values[np.isfinite(values)]
    if len(finite) == 0:
        return {"low": None, "high": None, "n": 0, "method": None}
    estimate = estimates.mean_estimate(finite, None, settings.resamples, settings.seed, settings.confidence)
    return {"low": estimate.low, "high": estimate.high, "n": estimate.n, "method": estimate.method}


def _float(value: float) -> float | None:
    return None if np.isnan(value) else float(value)
