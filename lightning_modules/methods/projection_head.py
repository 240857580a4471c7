"""Projection-head classifier: the backbone stays frozen; only the head trains.

The decoder's final hidden state (the output of its final norm: modeling/architecture.py) of the last non-pad
token is pooled: under a causal mask it is the only position that has seen the whole text. With `extra_token`,
a trainable embedding is placed after the text (through the embedding layer: modeling/injection.py) and pooled
instead. Head (`method.head`): LayerNorm -> Linear(h, hidden) -> activation -> Dropout -> Linear(hidden,
num_classes); the `classifier` LightningModule (lightning_modules/classifier.py), which this method brings,
trains it with cross-entropy."""

from __future__ import annotations

import torch
from torch import nn
from transformers import PreTrainedModel

from lightning_modules.methods import MethodContext
from modeling import architecture, injection

SUPPORTS = ("classifier",)  # the task modules it can train
MODULE = "classifier"  # the task module that holds the head
ACTIVATIONS = {"gelu": nn.GELU, "relu": nn.ReLU, "tanh": nn.Tanh, "silu": nn.SiLU}


def apply(model: PreTrainedModel, context: MethodContext) -> PreTrainedModel:
    """Return `model` with every parameter frozen (the classifier head adds the trainable ones)."""
    model.requires_grad_(False)
    return model


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
