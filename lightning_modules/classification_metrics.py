"""Classification metrics of a validation / test epoch (torchmetrics): accuracy (micro), macro F1 and the
confusion matrix, whose image is written to `<run dir>/confusion_matrix/<stage>_epoch<N>.png`."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import torch
from torch import nn
from torchmetrics.classification import MulticlassAccuracy, MulticlassConfusionMatrix, MulticlassF1Score

from figures.runs import plot_confusion


class ClassificationMetrics(nn.Module):
    """Accuracy (micro), macro F1 and confusion matrix of one stage."""

    def __init__(self, num_classes: int) -> None:
        super().__init__()
        self.accuracy = MulticlassAccuracy(num_classes, average="micro")
        self.macro_f1 = MulticlassF1Score(num_classes, average="macro")
        self.confusion = MulticlassConfusionMatrix(num_classes)

    def update(self, predictions: torch.Tensor, targets: torch.Tensor) -> None:
        for metric in (self.accuracy, self.macro_f1, self.confusion):
            metric.update(predictions, targets)

    def compute(self) -> tuple[dict[str, float], torch.Tensor]:
        """({accuracy, macro_f1}, confusion matrix [C, C] with true classes as rows), then reset."""
        scores = {"accuracy": float(self.accuracy.compute()), "macro_f1": float(self.macro_f1.compute())}
        matrix = self.confusion.compute()
        for metric in (self.accuracy, self.macro_f1, self.confusion):
            metric.reset()
        return scores, matrix


def log_classification_epoch(
    module: L.LightningModule, metrics: ClassificationMetrics, stage: str, class_names: list[str]
) -> None:
    """Log accuracy and macro F1 of the epoch and write its confusion-matrix image (rank zero)."""
    if not metrics.accuracy.update_count:
        return
    scores, matrix = metrics.compute()
    for name, value in scores.items():
        module.log(f"{stage}/{name}", value)
    if module.trainer.is_global_zero and not module.trainer.sanity_checking:
        path = (
            Path(module.trainer.default_root_dir)
            / "confusion_matrix"
            / f"{stage}_epoch{module.current_epoch}.png"
        )
        plot_confusion(matrix, class_names, path, f"{stage} epoch {module.current_epoch}")
