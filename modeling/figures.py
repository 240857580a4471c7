"""Figures written to files, and matplotlib set up for them in one place: the non-interactive Agg backend,
chosen before pyplot is first imported, so that plotting works without a display (CI, cluster nodes)."""

from __future__ import annotations

from pathlib import Path
from types import ModuleType

import torch


def pyplot() -> ModuleType:
    """`matplotlib.pyplot` on the Agg backend (imported on first use: most runs draw nothing)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


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
