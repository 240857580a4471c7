"""Projection-head classifier over a (frozen) causal-LM backbone, and the classification metrics.

The text runs through the backbone (its LM head on one position at most); the decoder's final hidden state
(the output of its final norm, taken through a hook: modeling/architecture.py) of the last non-pad
token is pooled: under a causal mask it is the only position that has seen the whole text (position 0 has seen
nothing but the first token). With `extra_token`, a trainable embedding is placed after the text (through the
embedding layer: modeling/injection.py) and pooled instead. Head: LayerNorm -> Linear(h, hidden) ->
activation -> Dropout -> Linear(hidden, num_classes); loss: cross-entropy.

Metrics (torchmetrics): accuracy (micro), macro F1 and the confusion matrix, whose image is written to
`<run dir>/confusion_matrix/<stage>_epoch<N>.png` at the end of every validation / test epoch.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
import torch
from omegaconf import DictConfig
from torch import nn
from torchmetrics import MeanMetric
from torchmetrics.classification import MulticlassAccuracy, MulticlassConfusionMatrix, MulticlassF1Score
from transformers import PreTrainedModel

from modeling import architecture, injection
from modeling.base_module import OptimisedModule, module_settings

ACTIVATIONS = {"gelu": nn.GELU, "relu": nn.ReLU, "tanh": nn.Tanh, "silu": nn.SiLU}


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


def plot_confusion(matrix: torch.Tensor, class_names: list[str], path: Path, title: str) -> Path:
    """Write the confusion matrix (rows: true class, columns: predicted) as an annotated PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

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


class SequenceClassifier(nn.Module):
    """Backbone decoder + last-token pooling (+ optional extra token) + projection head -> logits [B, C]."""

    def __init__(
        self,
        model: PreTrainedModel,
        num_classes: int,
        hidden: int = 128,
        activation: str = "gelu",
        dropout: float = 0.1,
        extra_token: bool = False,
    ) -> None:
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(
                f"method.head.activation must be one of {sorted(ACTIVATIONS)}, got {activation!r}"
            )
        self.model = model
        final, size = architecture.final_hidden_module(model)
        self.extra_token = nn.Parameter(torch.randn(size) * 0.02) if extra_token else None
        self.head = nn.Sequential(
            nn.LayerNorm(size),
            nn.Linear(size, hidden),
            ACTIVATIONS[activation](),
            nn.Dropout(dropout),
            nn.Linear(hidden, num_classes),
        )
        self.slots = injection.EmbeddingSlots(model) if extra_token else None
        self.keep_one_logit = (
            {"logits_to_keep": 1} if architecture.forward_accepts(model, "logits_to_keep") else {}
        )

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Class logits [B, C] of right-padded texts input_ids / attention_mask [B, T]."""
        last = attention_mask.sum(1) - 1  # [B]: index of the last non-pad token
        rows = torch.arange(len(input_ids), device=input_ids.device)
        if self.extra_token is not None:  # one more position after each text, holding the trainable token
            input_ids = torch.cat([input_ids, input_ids[:, :1]], 1)  # [B, T+1]; its id is overwritten below
            attention_mask = torch.cat([attention_mask, attention_mask[:, :1]], 1)
            last = last + 1
            attention_mask[rows, last] = 1
            self.slots.place(rows, last, self.extra_token.expand(len(rows), -1))
        hidden = final_hidden_states(
            self.model, input_ids=input_ids, attention_mask=attention_mask, **self.keep_one_logit
        )  # [B, T(+1), H]
        return self.head(hidden[rows, last].to(self.head[0].weight.dtype))


def final_hidden_states(model: PreTrainedModel, **inputs: Any) -> torch.Tensor:
    """The decoder's last hidden states [B, T, H] (after its final norm) for `inputs`, taken through a hook on
    the module the LM head reads from, so that no output format is assumed."""
    module, _ = architecture.final_hidden_module(model)
    captured: list[torch.Tensor] = []
    handle = module.register_forward_hook(
        lambda m, args, output: captured.append(
            output
            if isinstance(output, torch.Tensor)
            else next(o for o in output if isinstance(o, torch.Tensor))
        )
    )
    try:
        model(**inputs)
    finally:
        handle.remove()
    return captured[-1]


def text_inputs(batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """The prompt tokens of a classification batch (the label target cut off): input_ids, attention_mask [B,
    P]."""
    width = int(batch["prompt_length"].max())
    positions = torch.arange(width, device=batch["input_ids"].device)
    mask = (positions[None, :] < batch["prompt_length"][:, None]).long()
    return batch["input_ids"][:, :width] * mask, mask


class ClassifierModule(OptimisedModule):
    """Cross-entropy training of a SequenceClassifier; accuracy, macro F1 and confusion matrix per stage."""

    def __init__(
        self,
        model: PreTrainedModel,
        class_names: list[str],
        hidden: int = 128,
        activation: str = "gelu",
        dropout: float = 0.1,
        extra_token: bool = False,
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        betas: tuple[float, float] = (0.9, 0.999),
        warmup_ratio: float = 0.1,
        metrics_every_n_steps: int = 1,
    ) -> None:
        super().__init__(model, lr, weight_decay, betas, warmup_ratio, metrics_every_n_steps)
        self.class_names = list(class_names)
        self.head_config = {
            "class_names": self.class_names,
            "hidden": hidden,
            "activation": activation,
            "dropout": dropout,
            "extra_token": extra_token,
        }
        self.classifier = SequenceClassifier(
            model, len(class_names), hidden, activation, dropout, extra_token
        )
        self.losses = nn.ModuleDict({f"{stage}_loss": MeanMetric() for stage in ("train", "val", "test")})
        self.scores = nn.ModuleDict(
            {stage: ClassificationMetrics(len(class_names)) for stage in ("val", "test")}
        )

    @classmethod
    def from_config(cls, model: PreTrainedModel, cfg: DictConfig, datamodule: Any) -> ClassifierModule:
        """The module for a train.py config: classes from the DataModule, head from `method.head`,
        `cfg.optim`, `cfg.metrics`."""
        return cls(model, datamodule.class_names, **(cfg.method.get("head") or {}), **module_settings(cfg))

    @property
    def model(self) -> PreTrainedModel:
        """The backbone causal LM."""
        return self.classifier.model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.classifier(input_ids, attention_mask)

    def predict_classes(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Class scores [B, C] of a classification batch."""
        return self(*text_inputs(batch))

    def _shared_step(self, batch: dict[str, torch.Tensor], stage: str) -> torch.Tensor:
        logits = self.predict_classes(batch)
        loss = nn.functional.cross_entropy(logits.float(), batch["class_index"])
        self.losses[f"{stage}_loss"](loss.detach(), len(logits))
        self.log(
            f"{stage}/loss",
            self.losses[f"{stage}_loss"],
            on_step=stage == "train",
            on_epoch=True,
            prog_bar=True,
        )
        if stage != "train":
            self.scores[stage].update(logits.argmax(-1), batch["class_index"])
        return loss

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        return self._shared_step(batch, "train")

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self._shared_step(batch, "val")

    def test_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self._shared_step(batch, "test")

    def on_validation_epoch_end(self) -> None:
        log_classification_epoch(self, self.scores["val"], "val", self.class_names)

    def on_test_epoch_end(self) -> None:
        log_classification_epoch(self, self.scores["test"], "test", self.class_names)
