"""Whether a model can train on padding-free batches (datamodules/padding_free.py), checked on the model."""

from __future__ import annotations

import torch
from torch import nn

from datamodules.padding_free import model_inputs, one_row
from modeling import architecture

PROBE_OFFSET = 256  # tokens packed before the sequence whose logits are compared


@torch.no_grad()
def keeps_sequences_apart(model: nn.Module) -> bool:
    """Whether `model` keeps packed sequences apart: a short sequence packed after a long one gives the logits
    it gives alone (to 1e-5). A model that ignores position ids (remote code such as MiniMind), a method that
    drops them (peft prompt tuning), or an attention bias that depends on where a sequence sits in the row
    (ALiBi, to float32 rounding that grows with the row's length) does not."""
    vocab = architecture.input_embeddings(model).num_embeddings
    long, short = (
        [(7 * i + 3) % vocab for i in range(PROBE_OFFSET)],
        [(11 * i + 5) % vocab for i in range(16)],
    )
    device = next(model.parameters()).device
    batch = one_row([{"input_ids": long, "labels": long}, {"input_ids": short, "labels": short}])
    del batch["labels"]
    was_training = model.training
    model.eval()
    try:
        packed = model(**model_inputs({k: v.to(device) for k, v in batch.items()})).logits
        alone = model(input_ids=torch.tensor([short], device=device), use_cache=False).logits[0].float()
    except (TypeError, ValueError, RuntimeError):  # a forward that refuses position ids or use_cache
        return False
    finally:
        model.train(was_training)
    return packed.shape[1] == len(long) + len(short) and torch.allclose(
        packed[0, len(long) :].float(), alone, rtol=1e-5, atol=1e-5
    )
