"""What a list of collated batches holds: the share of padding, the supervised tokens per step, and the FLOPs
each side of a fine-tuning comparison spends on them."""

from __future__ import annotations

from torch import nn

from datamodules import IGNORE_INDEX
from datamodules.padding_free import example_lengths
from modeling.flops import batch_flops, flop_counts
from modeling.supervised import kept_positions


def padding_share(batches: list[dict]) -> float:
    """The share of the batches' token positions that are padding."""
    return sum(int((b["attention_mask"] == 0).sum()) for b in batches) / sum(
        b["attention_mask"].numel() for b in batches
    )


def supervised_per_timed_step(batches: list[dict], warmup: int) -> float:
    """Supervised (label) tokens per step over the timed steps (after `warmup`)."""
    timed = batches[warmup:]
    return sum(int((b["labels"] != IGNORE_INDEX).sum()) for b in timed) / len(timed)


def side_flops(model: nn.Module, padded: list[dict], packed: list[dict]) -> dict[str, list[int]]:
    """Training FLOPs (forward and backward) each side spends on each of the same steps, `padded[i]`
    holding the examples of `packed[i]`: lmlab padding-free (real tokens, each example's own attention, the
    output layer at the kept positions), lmlab padded (every padded position, kept positions in each row),
    HF Trainer (every padded position, the output layer at all of them) and the hand loop (packed rows
    attended as one sequence, the output layer at every position)."""
    counts = flop_counts(model)
    steps: dict[str, list[int]] = {
        side: [] for side in ("padding_free", "padded", "hf_trainer", "torch_loop")
    }
    for rows, row in zip(padded, packed, strict=True):
        batch, width = rows["input_ids"].shape  # [B, T]
        square = [width] * batch
        kept = len(kept_positions(row["labels"]))
        steps["padding_free"].append(batch_flops(counts, example_lengths(row), kept, True))
        steps["padded"].append(batch_flops(counts, square, batch * len(kept_positions(rows["labels"])), True))
        steps["hf_trainer"].append(batch_flops(counts, square, batch * width, True))
        rows_packed, length = row["input_ids"].shape  # [R, N]
        steps["torch_loop"].append(batch_flops(counts, [length] * rows_packed, rows_packed * length, True))
    return steps
