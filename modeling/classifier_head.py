"""The projection-head classifier over a causal LM, and how a saved run stores and restores it.

The decoder's final hidden state (the output of its final norm: modeling/architecture.py) of the last non-pad
token is pooled: under a causal mask it is the only position that has seen the whole text. With `extra_token`,
a trainable embedding is placed after the text (through the embedding layer: modeling/injection.py) and pooled
instead. Head (`method.head`): LayerNorm -> Linear(h, hidden) -> activation -> Dropout -> Linear(hidden,
num_classes). A saved run keeps the head's weights (HEAD_FILE; the backbone's are the model's own files) and
its settings (HEAD_CONFIG) beside the model.

Label likelihood, the other way a causal LM classifies, is `label_scores`: no trained head, every label's
summed log-probability after the prompt (modeling/log_probs.py).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn
from transformers import PreTrainedModel

from modeling import architecture, injection
from modeling.log_probs import label_logprobs
from modeling.model_checks import read_safetensors

ACTIVATIONS = {"gelu": nn.GELU, "relu": nn.ReLU, "tanh": nn.Tanh, "silu": nn.SiLU}
HEAD_FILE = "classifier_head.safetensors"
HEAD_CONFIG = "classifier.json"


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
        # [B, T(+1), H]
        hidden = architecture.final_hidden_states(
            self.model, input_ids=input_ids, attention_mask=attention_mask, **self.keep_one_logit
        )
        return self.head(hidden[rows, last].to(self.head[0].weight.dtype))


def text_inputs(batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """The prompt tokens of a classification batch (the label target cut off): input_ids, attention_mask [B,
    P]."""
    width = int(batch["prompt_length"].max())
    positions = torch.arange(width, device=batch["input_ids"].device)
    mask = (positions[None, :] < batch["prompt_length"][:, None]).long()
    return batch["input_ids"][:, :width] * mask, mask


def head_scores(classifier: SequenceClassifier, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Class logits [B, C] of a classification batch (its texts, the label targets cut off)."""
    return classifier(*text_inputs(batch))


def label_scores(
    model: PreTrainedModel, batch: dict[str, torch.Tensor], label_token_ids: list[list[int]], pad_id: int
) -> torch.Tensor:
    """Summed log P(label | text) [B, C] of every class's label tokens after each text of a classification
    batch."""
    prompts = [
        ids[:length].tolist() for ids, length in zip(batch["input_ids"], batch["prompt_length"], strict=True)
    ]
    return label_logprobs(model, prompts, label_token_ids, pad_id)


def save(classifier: SequenceClassifier, settings: dict[str, Any], target: Path) -> None:
    """Write the head's weights (not the backbone's) and the settings that rebuild it to `target`."""
    head = {
        name: p.detach().contiguous()
        for name, p in classifier.named_parameters()
        if not name.startswith("model.")
    }
    save_file(head, target / HEAD_FILE)
    (target / HEAD_CONFIG).write_text(json.dumps(settings, indent=2) + "\n")


def load(model: PreTrainedModel, directory: Path) -> tuple[SequenceClassifier, list[str]] | None:
    """The head saved in `directory` on its backbone `model`, with its class names; None when the directory
    holds no head. A head whose weights do not match its settings raises ValueError naming the file."""
    if not (directory / HEAD_CONFIG).exists():
        return None
    settings = json.loads((directory / HEAD_CONFIG).read_text())
    class_names = settings.pop("class_names")
    classifier = SequenceClassifier(model, len(class_names), **settings)
    path = directory / HEAD_FILE
    missing, unexpected = classifier.load_state_dict(read_safetensors(path), strict=False)
    missing = [name for name in missing if not name.startswith("model.")]
    if missing or unexpected:
        raise ValueError(f"{path}: does not match {HEAD_CONFIG} (missing {missing}, unexpected {unexpected})")
    return classifier, class_names
