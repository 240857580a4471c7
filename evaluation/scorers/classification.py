"""Classification scoring for evaluate.py: label likelihood (or the saved projection head) on every test
example; accuracy (Wilson interval), macro F1 (bootstrap interval over items) and a confusion matrix."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig
from torchmetrics.functional.classification import (
    multiclass_accuracy,
    multiclass_confusion_matrix,
    multiclass_f1_score,
)

from datamodules.task import Task
from evaluation.loaded import Loaded
from evaluation.scorers import Scored
from figures.runs import plot_confusion
from modeling import classifier_head
from modeling.progress import Progress
from stats import item_scores


def batch_size(cfg: DictConfig) -> int:
    """Examples per forward: `data.eval_batch_size` (else `data.batch_size`), as train.py's validation
    classifies."""
    return cfg.data.get("eval_batch_size") or cfg.data.batch_size


def outputs(
    cfg: DictConfig,
    loaded: Loaded,
    task: Task,
    records: list[dict[str, Any]],
    share: list[int],
    on_finished: Callable[[int, Any], None],
) -> list[list[float]]:
    """The class scores [C] of each record of `share` (indices into `records`): the saved projection head's
    logits, else every label's log-likelihood (modeling/classifier_head.py); each batch's handed to
    `on_finished` as it is scored."""
    if loaded.head is not None and loaded.head_classes != list(task.class_names):
        raise ValueError(
            f"ckpt={loaded.choice.ckpt}: its projection head was trained on classes {loaded.head_classes}, "
            f"task '{cfg.task.name}' has {list(task.class_names)} (task.class_names)"
        )
    examples = task.tokenize_all([records[i] for i in share], "test")
    device = loaded.head.head[0].weight.device if loaded.head is not None else loaded.model.device
    scores, size = [], batch_size(cfg)
    labels, pad = task.label_token_ids(), task.tokenizer.pad_token_id  # each label's tokens, rendered once
    with torch.no_grad(), Progress(len(examples), "examples classified") as progress:
        for first in range(0, len(examples), size):
            batch = {k: v.to(device) for k, v in task.collate(examples[first : first + size]).items()}
            if loaded.head is not None:
                scored = classifier_head.head_scores(loaded.head, batch).float().tolist()
            else:
                scored = classifier_head.label_scores(loaded.model, batch, labels, pad).float().tolist()
            for index, values in zip(share[first : first + size], scored, strict=True):
                on_finished(index, values)
            scores += scored
            progress.advance(len(scored))
    return scores


def score(
    cfg: DictConfig,
    task: Task,
    records: list[dict[str, Any]],
    class_scores: list[list[float]],
    run_dir: Path,
) -> Scored:
    """Rows of every test example from its class scores; accuracy and macro F1 with their intervals."""
    rows, classes = [], len(task.class_names)
    scores = torch.tensor(class_scores)  # [N, C]
    truth = torch.tensor([task.class_index(record) for record in records])  # [N]
    for index, (record, guess, gold, row_scores) in enumerate(
        zip(records, scores.argmax(-1).tolist(), truth.tolist(), class_scores, strict=True)
    ):
        rows.append(
            {
                "index": index,
                "where": record.get("_where"),
                "text": record[task.text_column],
                "gold": task.class_names[gold],
                "predicted": task.class_names[guess],
                "correct": float(guess == gold),
                "scores": dict(zip(task.class_names, row_scores, strict=True)),
            }
        )
    guesses = scores.argmax(-1)  # [N]
    values = {
        "accuracy": float(multiclass_accuracy(guesses, truth, classes, average="micro")),
        "macro_f1": float(multiclass_f1_score(guesses, truth, classes, average="macro")),
    }
    matrix = multiclass_confusion_matrix(guesses, truth, classes)  # [C, C], true classes as rows
    plot_confusion(
        matrix,
        task.class_names,
        run_dir / "confusion_matrix.png",
        f"{cfg.model.name} on {cfg.task.name}",
    )
    predicted = torch.tensor([task.class_names.index(row["predicted"]) for row in rows])  # [N]
    gold = torch.tensor([task.class_names.index(row["gold"]) for row in rows])  # [N]

    def macro_f1(indices: np.ndarray) -> float:
        picked = torch.from_numpy(indices)
        return float(multiclass_f1_score(predicted[picked], gold[picked], len(task.class_names), "macro"))

    item_scores.assign_ids(rows)
    intervals = item_scores.intervals(
        rows, values, {"accuracy": "correct"}, {"macro_f1": macro_f1}, cfg.statistics
    )
    return rows, {**values, "num_examples": len(rows)}, intervals
