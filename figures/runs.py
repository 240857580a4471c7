"""Figures of training and evaluation runs: a sweep's curves and metric against each swept parameter, an
SVD-LoRA run's rank per layer, a classifier's confusion matrix, an evaluation grid's bars with intervals,
pass@k and maj@k against k."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np
import torch

from figures import pyplot


def plot_confusion(matrix: torch.Tensor, class_names: list[str], path: Path, title: str) -> Path:
    """Write the confusion matrix (rows: true class, columns: predicted) as an annotated PNG."""
    plt = pyplot()

    path.parent.mkdir(parents=True, exist_ok=True)
    size = 1.5 + 0.7 * len(class_names)
    figure, axis = plt.subplots(figsize=(size + 1, size))
    image = axis.imshow(matrix.cpu().numpy(), cmap="Blues")
    for (row, column), count in zip(
        torch.cartesian_prod(*[torch.arange(len(class_names))] * 2).tolist(),
        matrix.flatten().tolist(),
        strict=True,
    ):
        axis.text(column, row, str(int(count)), ha="center", va="center")
    axis.set_xticks(range(len(class_names)), class_names, rotation=45, ha="right")
    axis.set_yticks(range(len(class_names)), class_names)
    axis.set_xlabel("predicted")
    axis.set_ylabel("true")
    axis.set_title(title)
    figure.colorbar(image, ax=axis)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def grid_bars(rows: list[dict[str, Any]], metric: str, path: Path, stage: str) -> Path:
    """One bar per model and data set of an evaluation grid's `metric`, with its interval as error bars."""
    plt = pyplot()

    datasets = list(dict.fromkeys(r["dataset"] for r in rows))
    model_names = list(dict.fromkeys(r["model"] for r in rows))
    width = 0.8 / len(model_names)
    figure, axis = plt.subplots(figsize=(1.6 + 1.4 * len(datasets), 3.6))
    for i, model_name in enumerate(model_names):
        mine = {r["dataset"]: r for r in rows if r["model"] == model_name}
        heights = [(mine.get(d) or {}).get(metric) or 0.0 for d in datasets]
        # error bars: the interval's distance below and above each score (none where there is no interval)
        errors = [
            [
                max(0.0, h - ((mine.get(d) or {}).get(f"{metric}_low") or h)),
                max(0.0, ((mine.get(d) or {}).get(f"{metric}_high") or h) - h),
            ]
            for d, h in zip(datasets, heights, strict=True)
        ]
        axis.bar(
            [d + i * width for d in range(len(datasets))],
            heights,
            width,
            yerr=np.array(errors).T,
            capsize=3,
            label=model_name,
        )
    axis.set_xticks([d + width * (len(model_names) - 1) / 2 for d in range(len(datasets))], datasets)
    axis.set_ylim(0, max(0.05, 1.15 * max(r.get(f"{metric}_high") or r.get(metric) or 0.0 for r in rows)))
    axis.set_ylabel(metric)
    axis.set_title(f"{metric} per dataset ({stage.replace('_', '-')}), with intervals")
    axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path


def rank_map(grid: torch.Tensor, layers: list[int], kinds: list[str], path: Path) -> Path:
    """A layer x module heatmap of SVD-LoRA's chosen ranks (`grid` [layers, kinds])."""
    plt = pyplot()

    figure, axis = plt.subplots(figsize=(1.2 + 0.9 * len(kinds), 1.0 + 0.25 * len(layers)))
    image = axis.imshow(grid.numpy(), aspect="auto", cmap="viridis")
    axis.set_xticks(range(len(kinds)), kinds, rotation=45, ha="right")
    axis.set_yticks(range(len(layers)), [str(n) for n in layers])
    axis.set_ylabel("layer")
    axis.set_title("svd_lora rank per layer")
    figure.colorbar(image, ax=axis)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def sweep(
    path: Path,
    curves: dict[str, list[tuple[float, float]]],
    curve_name: str,
    panels: list[tuple[str, list[Any], list[float], bool]],
    metric: str,
) -> Path:
    """A sweep's figure: every job's `curves` (label -> (step, value) points) on one axis, then one panel per
    swept parameter (key, its values, the metric at each, whether the values are numbers: a log axis for
    positive numbers spanning 10x or more)."""
    plt = pyplot()

    count = (1 if curves else 0) + len(panels)
    figure, axes = plt.subplots(1, count, figsize=(4.2 * count, 3.4), squeeze=False)
    axes = list(axes[0])
    if curves:
        axis = axes.pop(0)
        for label, points in curves.items():
            steps, values = zip(*points, strict=True)
            axis.plot(steps, values, marker=".", label=label)
        axis.set(xlabel="step", ylabel=curve_name, title="validation loss per job")
        axis.legend(fontsize=6)
    for axis, (key, xs, ys, numeric) in zip(axes, panels, strict=True):
        if numeric:
            axis.scatter(xs, ys)
            if xs and min(xs) > 0 and max(xs) >= 10 * min(xs):
                axis.set_xscale("log")
        else:
            axis.scatter(range(len(xs)), ys)
            axis.set_xticks(range(len(xs)), xs, rotation=30, fontsize=7)
        axis.set(xlabel=key, ylabel=metric, title=f"{metric} vs {key}")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def pass_at_k_curves(
    runs: dict[str, tuple[dict[str, float], dict[str, dict[str, Any]]]], path: Path, title: str
) -> Path:
    """pass@k and maj@k against k (log 2 axis), one line per run (label -> its metrics and intervals) and
    score, with each point's interval."""
    plt = pyplot()

    figure, axis = plt.subplots(figsize=(5.5, 3.8))
    for label, (metrics, intervals) in runs.items():
        curves: dict[str, list[tuple[int, str]]] = {}
        for key in metrics:
            match = re.fullmatch(r"(pass|maj)@(\d+)_(\w+)", key)
            if match:
                curves.setdefault(f"{match[1]}@k {match[3]}", []).append((int(match[2]), key))
        for name, points in sorted(curves.items()):
            ks, keys = zip(*sorted(points), strict=True)
            values = np.array([metrics[key] for key in keys])
            low = np.array([intervals.get(key, {}).get("low", metrics[key]) for key in keys])
            high = np.array([intervals.get(key, {}).get("high", metrics[key]) for key in keys])
            bars = [values - low, high - values]
            axis.errorbar(ks, values, yerr=bars, marker="o", capsize=3, label=f"{label}: {name}")
    axis.set_xscale("log", base=2)
    axis.set(xlabel="k (samples)", ylabel="score", title=f"pass@k and maj@k on {title}", ylim=(0, 1.02))
    axis.legend(fontsize=6)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path
