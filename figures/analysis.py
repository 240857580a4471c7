"""Figures of the analysis entrypoints (matplotlib, Agg backend, PNG); importing it loads matplotlib."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from figures import pyplot

plt = pyplot()

CLASS_COLOURS = {
    "KMI": "tab:green",
    "NI": "tab:red",
    "OC": "tab:gray",
    "LABEL": "tab:green",
    "TEXT": "tab:blue",
    "STUDENT": "tab:blue",
    "TEACHER": "tab:orange",
    "OTHER": "tab:gray",
}
PALETTE = ["tab:purple", "tab:brown", "tab:pink", "tab:olive", "tab:cyan"]


def class_colours(classes: list[str]) -> dict[str, str]:
    """A colour per token class: the fixed ones for the shipped tasks' classes, a palette for others."""
    unknown = [c for c in dict.fromkeys(classes) if c not in CLASS_COLOURS]
    return {
        c: CLASS_COLOURS.get(c) or PALETTE[unknown.index(c) % len(PALETTE)] for c in dict.fromkeys(classes)
    }


def _token_labels(tokens: list[str]) -> list[str]:
    return [t.replace("Ġ", " ").replace("Ċ", "\\n").replace("\n", "\\n") for t in tokens]


def attention_heatmap(example: dict[str, Any], heads: list[list[int]], path: Path) -> Path:
    """Token-level heatmap of one input: layer-averaged map and selected (layer, head) rows from the answer
    position; tokens coloured by class when the task labels classes."""
    name = next(iter(example["layers"][0]))
    maps = np.stack([layer[name].mean(1).numpy() for layer in example["layers"]])  # [L, H, K]
    rows, labels = [maps.mean((0, 1))], [f"{name}: mean of layers+heads"]
    for layer, head in heads:
        if -len(maps) <= layer < len(maps) and -maps.shape[1] <= head < maps.shape[1]:
            rows.append(maps[layer, head])
            labels.append(f"layer {layer % len(maps)} head {head % maps.shape[1]}")
    tokens, classes = example["tokens"], example["classes"]
    figure, axis = plt.subplots(figsize=(max(8.0, 0.16 * len(tokens)), 1.2 + 0.45 * len(rows)))
    image = axis.imshow(np.stack(rows), aspect="auto", cmap="viridis")
    axis.set_yticks(range(len(rows)), labels, fontsize=7)
    axis.set_xticks(range(len(tokens)), _token_labels(tokens), rotation=90, fontsize=5)
    colours = class_colours(classes)
    for tick, cls in zip(axis.get_xticklabels(), classes, strict=False):
        tick.set_color(colours[cls])
    figure.colorbar(image, ax=axis, fraction=0.02)
    legend = ", ".join(f"{c} {colour.removeprefix('tab:')}" for c, colour in colours.items())
    axis.set_title(
        "attention from the answer position" + (f" (token colours: {legend})" if legend else ""), fontsize=8
    )
    return _save(figure, path)


def text_heatmap(text_maps: Any, pairs: list[list[int]], path: Path) -> Path:
    """Query x key heatmaps of one text, tokens on both axes: the mean over the chosen layers and heads, then
    each (layer, head) of `pairs` that was chosen."""
    name = next(iter(text_maps.maps))
    values = text_maps.maps[name].numpy()  # [L, H, T, T]
    panels = [
        (
            f"{name}: mean of {len(text_maps.layers)} layers x {len(text_maps.heads)} heads",
            values.mean((0, 1)),
        )
    ]
    for layer, head in pairs:
        layer, head = layer % text_maps.num_layers, head % text_maps.num_heads
        if layer in text_maps.layers and head in text_maps.heads:
            panels.append(
                (
                    f"layer {layer} head {head}",
                    values[text_maps.layers.index(layer), text_maps.heads.index(head)],
                )
            )
    size = min(16.0, 2.5 + 0.22 * len(text_maps.tokens))
    figure, axes = plt.subplots(1, len(panels), figsize=(size * len(panels), size), squeeze=False)
    labels = _token_labels(text_maps.tokens)
    for axis, (title, matrix) in zip(axes[0], panels, strict=True):
        image = axis.imshow(matrix, cmap="viridis")
        axis.set_xticks(range(len(labels)), labels, rotation=90, fontsize=6)
        axis.set_yticks(range(len(labels)), labels, fontsize=6)
        axis.set(xlabel="key", ylabel="query")
        axis.set_title(title, fontsize=8)
        figure.colorbar(image, ax=axis, fraction=0.04)
    return _save(figure, path)


def allocation_by_layer(summary: dict[str, Any], path: Path, title: str) -> Path:
    """Per-layer allocation ratio of each class, one panel per analysed map."""
    figure, axes = plt.subplots(1, len(summary), figsize=(4.5 * len(summary), 3.4), squeeze=False)
    for axis, (name, entry) in zip(axes[0], summary.items(), strict=True):
        for cls, colour in class_colours(list(entry["ratio"])).items():
            values = [np.nan if v is None else v for v in entry["ratio"][cls]["per_layer"]]
            axis.plot(range(len(values)), values, marker="o", markersize=3, color=colour, label=cls)
        axis.set_xlabel("layer")
        axis.set_ylabel("allocation ratio")
        axis.set_title(f"{name} map", fontsize=9)
        axis.legend(fontsize=7)
    figure.suptitle(title, fontsize=10)
    return _save(figure, path)


def allocation_comparison(results: list[dict[str, Any]], path: Path) -> Path:
    """Side-by-side bars: mean allocation ratio of each class per run (first map of each), with std."""
    entries = [next(iter(r["maps"].values()))["ratio"] for r in results]
    colours = class_colours([c for entry in entries for c in entry])
    figure, axis = plt.subplots(figsize=(2.0 + 1.8 * len(results), 3.6))
    width = 0.8 / len(colours)
    for i, (cls, colour) in enumerate(colours.items()):
        means = [(entry.get(cls) or {}).get("mean") or 0.0 for entry in entries]
        stds = [(entry.get(cls) or {}).get("std") or 0.0 for entry in entries]
        axis.bar(np.arange(len(results)) + i * width, means, width, yerr=stds, color=colour, label=cls)
    axis.set_xticks(
        np.arange(len(results)) + width * (len(colours) - 1) / 2,
        [f"{r['model']}\n{r['task']}" for r in results],
        fontsize=8,
    )
    axis.set_ylabel("allocation ratio")
    axis.legend()
    return _save(figure, path)


def seed_band(curves: list[list[tuple[float, float]]]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(steps, mean, s.d.) over several seeds' curves of one metric, at the steps every curve has; the s.d.
    is 0 with one seed."""
    common = sorted(set.intersection(*(set(step for step, _ in curve) for curve in curves)))
    values = np.array([[dict(curve)[step] for step in common] for curve in curves])  # [seeds, steps]
    spread = values.std(axis=0, ddof=1) if len(curves) > 1 else np.zeros(len(common))
    return np.array(common), values.mean(axis=0), spread


def banded(axis: plt.Axes, runs: list[dict[str, Any]], key: str, **style: Any) -> None:
    """One line per configuration: the mean over its seeds' `key` curves, with a band of one s.d."""
    for name in dict.fromkeys(run["name"] for run in runs):
        curves = [run["curves"][key] for run in runs if run["name"] == name and run["curves"].get(key)]
        if not curves:
            continue
        steps, mean, spread = seed_band(curves)
        (line,) = axis.plot(steps, mean, label=f"{name} (n={len(curves)})", **style)
        axis.fill_between(steps, mean - spread, mean + spread, color=line.get_color(), alpha=0.2)


def ablation_figures(runs: list[dict[str, Any]], configs: list[dict[str, Any]], out_dir: Path) -> list[Path]:
    """Training-loss curves and validation convergence (mean over seeds, band of one s.d.), final performance
    bars (means with their t intervals over seeds) and the efficiency scatter, one entry per configuration."""
    paths = []
    figure, axis = plt.subplots(figsize=(6.5, 4))
    banded(axis, runs, "train/loss_step", linewidth=1)
    axis.set(xlabel="step", ylabel="training loss", title="Training loss (mean over seeds, band: 1 s.d.)")
    axis.legend(fontsize=7)
    paths.append(_save(figure, out_dir / "training_loss_curves.png"))

    names = [c["config"] for c in configs]
    figure, axes = plt.subplots(1, 3, figsize=(12, 3.6))
    for axis, key, label in zip(
        axes,
        ("val_loss", "val_token_acc", "val_perplexity"),
        ("validation loss", "next-token accuracy", "perplexity"),
        strict=True,
    ):
        means = [c[key] or 0.0 for c in configs]
        errors = [
            [
                m - (c[f"{key}_low"] if c[f"{key}_low"] is not None else m)
                for m, c in zip(means, configs, strict=True)
            ],
            [
                (c[f"{key}_high"] if c[f"{key}_high"] is not None else m) - m
                for m, c in zip(means, configs, strict=True)
            ],
        ]
        axis.bar(names, means, yerr=errors, capsize=3, color="tab:blue")
        axis.set_title(f"{label} (mean, t interval over seeds)", fontsize=9)
        axis.tick_params(axis="x", rotation=45, labelsize=7)
    paths.append(_save(figure, out_dir / "final_performance.png"))

    figure, axis = plt.subplots(figsize=(5.5, 4))
    for config in configs:
        axis.scatter(config["steps_per_s"] or 0.0, config["val_loss"] or np.nan)
        axis.annotate(config["config"], (config["steps_per_s"] or 0.0, config["val_loss"] or 0.0), fontsize=7)
    axis.set(xlabel="steps / s", ylabel="final validation loss", title="Efficiency vs quality (means)")
    paths.append(_save(figure, out_dir / "efficiency.png"))

    figure, axis = plt.subplots(figsize=(6.5, 4))
    banded(axis, runs, "val/loss", marker="o", markersize=3)
    axis.set(xlabel="step", ylabel="validation loss", title="Convergence (mean over seeds, band: 1 s.d.)")
    axis.legend(fontsize=7)
    paths.append(_save(figure, out_dir / "convergence.png"))
    return paths


def _save(figure: plt.Figure, path: Path) -> Path:
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path


def coupling_heatmap(matrix: np.ndarray, labels: list[str], path: Path) -> Path:
    """GradSim matrix as a heatmap, pieces in chain order."""
    size = min(14.0, 3.0 + 0.22 * len(labels))
    figure, axis = plt.subplots(figsize=(size, size * 0.85))
    image = axis.imshow(matrix, cmap="RdBu_r", vmin=-1, vmax=1)
    axis.set_xticks(range(len(labels)), labels, rotation=90, fontsize=5)
    axis.set_yticks(range(len(labels)), labels, fontsize=5)
    axis.set_title("GradSim (cosine of per-example gradients)")
    figure.colorbar(image, ax=axis, fraction=0.04)
    return _save(figure, path)


def ripple_panels(
    matrix: np.ndarray, pairs: dict[str, np.ndarray], experiments: list[dict[str, Any]], path: Path
) -> Path:
    """Six panels: GradSim and ripple distributions, their scatter, within/across-chain splits, edit
    outcomes."""
    figure, axes = plt.subplots(2, 3, figsize=(13, 7.5))
    upper = matrix[np.triu_indices(len(matrix), k=1)]
    axes[0, 0].hist(upper, bins=30, color="tab:blue")
    axes[0, 0].set(title="GradSim distribution", xlabel="GradSim")
    axes[0, 1].hist(pairs["ripple"], bins=30, color="tab:orange")
    axes[0, 1].set(title="Ripple strength distribution", xlabel="|delta log P|")
    colours = np.where(pairs["within"], "tab:red", "tab:gray")
    axes[0, 2].scatter(pairs["gradsim"], pairs["ripple"], c=colours, s=8)
    axes[0, 2].set(title="GradSim vs ripple (red: same chain)", xlabel="GradSim", ylabel="|delta log P|")
    for axis, key, title in (
        (axes[1, 0], "gradsim", "GradSim by pair type"),
        (axes[1, 1], "ripple", "Ripple by pair type"),
    ):
        groups = [pairs[key][pairs["within"]], pairs[key][~pairs["within"]]]
        axis.boxplot([g if len(g) else [np.nan] for g in groups])
        axis.set_xticks([1, 2], ["within chain", "across chains"])
        axis.set(title=title)
    successes = [e["success"] for e in experiments]
    axes[1, 2].bar(
        ["edit succeeded", "edit failed"],
        [sum(successes), len(successes) - sum(successes)],
        color=["tab:green", "tab:red"],
    )
    axes[1, 2].set(title="MEMIT edit outcomes")
    return _save(figure, path)


def coupling_comparison(
    matrices: list[np.ndarray], pairs: list[dict[str, np.ndarray]], rows: list[dict[str, Any]], path: Path
) -> Path:
    """Three panels across models: GradSim distribution, ripple-strength distribution, Spearman r with its
    CI."""
    labels = [row["model"] for row in rows]
    figure, axes = plt.subplots(1, 3, figsize=(4 + 2.2 * len(labels), 4))
    axes[0].boxplot([m[np.triu_indices(len(m), k=1)] for m in matrices])
    axes[0].set(title="GradSim (pairs of pieces)", ylabel="GradSim")
    axes[1].boxplot([p["ripple"] for p in pairs])
    axes[1].set(title="Ripple strength", ylabel="|delta log P|")
    r = np.array([row["spearman_r"] for row in rows])
    errors = np.array(
        [
            [row["spearman_r"] - row["spearman_ci_low"] for row in rows],
            [row["spearman_ci_high"] - row["spearman_r"] for row in rows],
        ]
    )
    colours = ["tab:green" if row["hypothesis_held"] else "tab:gray" for row in rows]
    axes[2].bar(range(1, len(rows) + 1), r, yerr=errors, color=colours, capsize=4)
    axes[2].axhline(0, color="black", linewidth=0.8)
    axes[2].set(title="GradSim-ripple Spearman r (green: held)", ylabel="Spearman r")
    for axis in axes:
        axis.set_xticks(range(1, len(labels) + 1), labels, rotation=30, ha="right")
    return _save(figure, path)
