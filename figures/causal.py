"""Figures of the causal analyses (analysis/causal.py): ROME-style trace heatmaps and curves, the share of the
noise's damage each patched layer recovers, the knockout effects per window, and the logit lens."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from figures import pyplot
from figures.analysis import _save, _token_labels

plt = pyplot()
KIND_COLOURS = {"block": "tab:purple", "mlp": "tab:green", "attention": "tab:red", "mixer": "tab:blue"}


def trace_heatmaps(trace: dict[str, Any], tokens: list[str], subject: list[int], path: Path) -> Path:
    """One fact's indirect effects, tokens x layers, one panel per site kind (subject tokens starred)."""
    kinds = list(trace["kinds"])
    figure, axes = plt.subplots(
        1, len(kinds), figsize=(4.5 * len(kinds), 0.35 * len(tokens) + 2), squeeze=False
    )
    labels = [f"{t}*" if i in subject else t for i, t in enumerate(_token_labels(tokens))]
    for axis, kind in zip(axes[0], kinds, strict=True):
        entry = trace["kinds"][kind]
        values = np.asarray(entry["effect"]).T  # [tokens, layers]
        image = axis.imshow(
            values, aspect="auto", cmap={"block": "Purples", "mlp": "Greens"}.get(kind, "Reds")
        )
        axis.set_yticks(range(len(labels)), labels, fontsize=7)
        axis.set_xticks(range(len(entry["layers"])), entry["layers"], fontsize=6)
        axis.set_xlabel("layer")
        axis.set_title(f"{kind}: P(answer) restored - corrupted", fontsize=9)
        figure.colorbar(image, ax=axis, shrink=0.6)
    return _save(figure, path)


def trace_curves(summary: dict[str, Any], path: Path) -> Path:
    """The average indirect effect per layer at the subject's last token and at the last token, per site
    kind, with intervals over facts."""
    groups = ("last_subject", "last")
    figure, axes = plt.subplots(1, len(groups), figsize=(10, 3.5), squeeze=False)
    for axis, group in zip(axes[0], groups, strict=True):
        for kind, entry in summary.items():
            rows = entry.get(group, {})
            if rows:
                _banded(axis, rows, kind, KIND_COLOURS.get(kind, "tab:gray"))
        axis.axhline(0, color="black", linewidth=0.5)
        axis.set_title(f"average indirect effect at the {group.replace('_', ' ')} token", fontsize=9)
        axis.set_xlabel("layer")
        axis.legend(fontsize=7)
    return _save(figure, path)


def _banded(axis: plt.Axes, rows: dict[str, dict[str, Any]], label: str, colour: str) -> None:
    layers = [int(layer) for layer in rows]
    means = np.array([rows[key]["mean"] for key in rows], dtype=float)
    low = np.array([rows[key].get("low", np.nan) for key in rows], dtype=float)
    high = np.array([rows[key].get("high", np.nan) for key in rows], dtype=float)
    axis.plot(layers, means, marker="o", markersize=3, color=colour, label=label)
    axis.fill_between(layers, low, high, color=colour, alpha=0.2)


def patch_curves(shares: dict[str, dict[str, Any]], path: Path) -> Path:
    """The share of the clean-minus-noisy log-prob gap recovered by patching each layer, per site kind."""
    figure, axis = plt.subplots(figsize=(6, 3.5))
    for kind, rows in shares.items():
        _banded(
            axis,
            {layer: {"mean": r["value"], "low": r["low"], "high": r["high"]} for layer, r in rows.items()},
            kind,
            KIND_COLOURS.get(kind, "tab:gray"),
        )
    axis.axhline(0, color="black", linewidth=0.5)
    axis.axhline(1, color="black", linewidth=0.5, linestyle=":")
    axis.set_xlabel("patched layer")
    axis.set_ylabel("share of the gap recovered")
    axis.legend(fontsize=7)
    return _save(figure, path)


def head_shares(shares: dict[str, dict[str, Any]], path: Path) -> Path:
    """The share of the gap recovered by patching each head (`<layer>.<head>`), layers x heads."""
    cells = {tuple(int(part) for part in unit.split(".")): entry["value"] for unit, entry in shares.items()}
    layers = sorted({layer for layer, _ in cells})
    heads = max(head for _, head in cells) + 1
    grid = np.array([[cells.get((layer, head), np.nan) for head in range(heads)] for layer in layers])
    figure, axis = plt.subplots(figsize=(max(4, 0.4 * heads + 2), max(3, 0.3 * len(layers) + 1.5)))
    image = axis.imshow(grid, aspect="auto", cmap="RdBu", vmin=-1, vmax=1)
    axis.set_yticks(range(len(layers)), layers, fontsize=7)
    axis.set_xlabel("head")
    axis.set_ylabel("layer")
    axis.set_title("share of the gap recovered per head", fontsize=9)
    figure.colorbar(image, ax=axis, shrink=0.7)
    return _save(figure, path)


def knockout_bars(table: list[dict[str, Any]], path: Path, metric: str) -> Path:
    """Knockout and control minus the plain run, per window, with intervals."""
    rows = [r for r in table if r["b"] == "plain"]
    figure, axis = plt.subplots(figsize=(max(4, 0.8 * len(rows)), 3.5))
    colours = ["tab:red" if r["a"].startswith("knockout") else "tab:gray" for r in rows]
    errors = [[r["difference"] - r["low"] for r in rows], [r["high"] - r["difference"] for r in rows]]
    axis.bar(range(len(rows)), [r["difference"] for r in rows], yerr=errors, color=colours, capsize=3)
    axis.set_xticks(range(len(rows)), [r["a"] for r in rows], rotation=45, ha="right", fontsize=7)
    axis.axhline(0, color="black", linewidth=0.5)
    axis.set_ylabel(f"{metric}: variant - plain")
    return _save(figure, path)


def lens_curves(summary: dict[str, dict[str, Any]], path: Path) -> Path:
    """Probability of the gold next token per layer through the logit lens, per prompt kind (clean, noisy)."""
    figure, axis = plt.subplots(figsize=(6, 3.5))
    for (prompt, rows), colour in zip(summary.items(), ("tab:green", "tab:red", "tab:blue"), strict=False):
        _banded(axis, rows["probability"], prompt, colour)
    axis.set_xlabel("layer")
    axis.set_ylabel("P(gold next token)")
    axis.legend(fontsize=7)
    return _save(figure, path)
