"""Classification scoring for evaluate.py: label likelihood (or the saved projection head) on every test
example; accuracy (Wilson interval), macro F1 (bootstrap interval over items) and a confusion matrix."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig
from torchmetrics.functional.classification import multiclass_f1_score
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from lightning_modules.classification_metrics import ClassificationMetrics, plot_confusion
from lightning_modules.label_lm import LabelLMModule
from runtime import item_scores
from runtime.saved_run import load_classifier


def score(
    cfg: DictConfig,
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    datamodule: Any,
    records: list[dict[str, Any]],
    run_dir: Path,
) -> tuple[list[dict[str, Any]], dict[str, float], dict[str, dict[str, Any]]]:
    """Classify every test example (label likelihood, or the saved projection head); accuracy and macro F1
    with their intervals."""
    module = load_classifier(model, cfg)
    if module is None:  # no saved head: the label likelihood
        module = LabelLMModule(
            model, datamodule.label_token_ids(), datamodule.class_names, datamodule.tokenizer.pad_token_id
        )
    module.eval()
    examples = datamodule.tokenize_all(records, "test")
    metrics, rows, size = ClassificationMetrics(len(datamodule.class_names)), [], cfg.generation.batch_size
    with torch.no_grad():
        for first in range(0, len(examples), size):
            batch = datamodule.collate(examples[first : first + size])
            # [B, C]
            scores = module.predict_classes({k: v.to(module.device) for k, v in batch.items()}).cpu()
            predicted = scores.argmax(-1)
            metrics.update(predicted, batch["class_index"])
            for offset, (record, guess, truth) in enumerate(
                zip(
                    records[first : first + size],
                    predicted.tolist(),
                    batch["class_index"].tolist(),
                    strict=True,
                )
            ):
                rows.append(
                    {
                        "index": first + offset,
                        "where": record.get("_where"),
                        "text": record[datamodule.text_column],
                        "gold": datamodule.class_names[truth],
                        "predicted": datamodule.class_names[guess],
                        "correct": float(guess == truth),
                        "scores": dict(zip(datamodule.class_names, scores[offset].tolist(), strict=True)),
                    }
                )
    values, matrix = metrics.compute()
    plot_confusion(
        matrix,
        datamodule.class_names,
        run_dir / "confusion_matrix.png",
        f"{cfg.model.name} on {cfg.task.name}",
    )
    predicted = torch.tensor([datamodule.class_names.index(row["predicted"]) for row in rows])  # [N]
    gold = torch.tensor([datamodule.class_names.index(row["gold"]) for row in rows])  # [N]

    def macro_f1(indices: np.ndarray) -> float:
        picked = torch.from_numpy(indices)
        return float(
            multiclass_f1_score(predicted[picked], gold[picked], len(datamodule.class_names), "macro")
        )

    item_scores.assign_ids(rows)
    intervals = item_scores.intervals(
        rows, values, {"accuracy": "correct"}, {"macro_f1": macro_f1}, cfg.statistics
    )
    return rows, {**values, "num_examples": len(rows)}, intervals
