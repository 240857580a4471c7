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


def outputs(
    cfg: DictConfig,
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    datamodule: Any,
    records: list[dict[str, Any]],
    share: range,
) -> list[list[float]]:
    """The class scores [C] of each record of `share` (label likelihood, or the saved projection head)."""
    module = load_classifier(model, cfg)
    if module is None:  # no saved head: the label likelihood
        module = LabelLMModule(
            model, datamodule.label_token_ids(), datamodule.class_names, datamodule.tokenizer.pad_token_id
        )
    if cfg.model.get("device_map") is None:  # the saved head goes where the model was placed
        module = module.to(model.device)
    module.eval()
    examples = datamodule.tokenize_all([records[i] for i in share], "test")
    scores, size = [], cfg.generation.batch_size
    with torch.no_grad():
        for first in range(0, len(examples), size):
            batch = datamodule.collate(examples[first : first + size])
            scores += (
                module.predict_classes({k: v.to(module.device) for k, v in batch.items()}).float().tolist()
            )
    return scores


def score(
    cfg: DictConfig,
    datamodule: Any,
    records: list[dict[str, Any]],
    class_scores: list[list[float]],
    run_dir: Path,
) -> tuple[list[dict[str, Any]], dict[str, float], dict[str, dict[str, Any]]]:
    """Rows of every test example from its class scores; accuracy and macro F1 with their intervals."""
    metrics, rows = ClassificationMetrics(len(datamodule.class_names)), []
    scores = torch.tensor(class_scores)  # [N, C]
    truth = torch.tensor([datamodule.class_index(record) for record in records])  # [N]
    metrics.update(scores.argmax(-1), truth)
    for index, (record, guess, gold, row_scores) in enumerate(
        zip(records, scores.argmax(-1).tolist(), truth.tolist(), class_scores, strict=True)
    ):
        rows.append(
            {
                "index": index,
                "where": record.get("_where"),
                "text": record[datamodule.text_column],
                "gold": datamodule.class_names[gold],
                "predicted": datamodule.class_names[guess],
                "correct": float(guess == gold),
                "scores": dict(zip(datamodule.class_names, row_scores, strict=True)),
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
