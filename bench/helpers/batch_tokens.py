"""What a list of collated batches holds: the share of padding, the supervised tokens per step."""

from __future__ import annotations

from datamodules import IGNORE_INDEX


def padding_share(batches: list[dict]) -> float:
    """The share of the batches' token positions that are padding."""
    return sum(int((b["attention_mask"] == 0).sum()) for b in batches) / sum(
        b["attention_mask"].numel() for b in batches
    )


def supervised_per_timed_step(batches: list[dict], warmup: int) -> float:
    """Supervised (label) tokens per step over the timed steps (after `warmup`)."""
    timed = batches[warmup:]
    return sum(int((b["labels"] != IGNORE_INDEX).sum()) for b in timed) / len(timed)
