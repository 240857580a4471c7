"""The order of training examples: a seeded shuffle per epoch (optionally grouped by length), sharded over
ranks, resumable mid-epoch."""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch
from torch.utils.data import DistributedSampler


class EpochSeededSampler(DistributedSampler):
    """Shuffles with a permutation fixed by (seed, epoch), optionally groups it by length (`lengths`), shards
    it over `num_replicas` ranks and can start `start_batch` batches into epoch `start_epoch`, so a run
    resumed mid-epoch sees exactly the batches it had left. With `repeats` > 1 every batch comes that many
    times in a row (a rank's last batch filled from its first examples, so batches stay whole): GRPO's
    `num_iterations` optimiser steps on one generation batch.

    It subclasses DistributedSampler so Lightning shards nothing a second time; with one replica the order is
    the plain permutation. `len()` is the whole epoch's share, as Lightning's progress counters expect.
    """

    def __init__(
        self,
        length: int,
        seed: int,
        num_replicas: int = 1,
        rank: int = 0,
        batch_size: int = 1,
        start_epoch: int = 0,
        start_batch: int = 0,
        lengths: list[int] | None = None,
        repeats: int = 1,
    ) -> None:
        super().__init__(range(length), num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed)
        self.length, self.batch_size, self.lengths = length, batch_size, lengths
        self.start_epoch, self.start_batch = start_epoch, start_batch
        self.repeats = repeats
        # the DataLoader draws its worker base seed from this generator, reseeded per epoch, not from the
        # global RNG: dropout draws then do not depend on whether a run was interrupted, and worker seeds
        # follow (seed, epoch)
        self.loader_generator = torch.Generator()
        self.set_epoch(start_epoch)

    def resume_at(self, epoch: int, batch: int) -> None:
        """Start `batch` batches into `epoch` (a checkpoint restored after this sampler was built)."""
        self.start_epoch, self.start_batch = epoch, batch
        self.set_epoch(epoch)

    def set_epoch(self, epoch: int) -> None:
        """Called by Lightning at the start of every epoch."""
        super().set_epoch(epoch)
        self.loader_generator.manual_seed(self.seed + epoch)

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        order = torch.randperm(self.length, generator=generator).tolist()
        order += order[: self.total_size - len(order)]  # pad so every rank gets num_samples indices
        if self.lengths is not None:
            order = self._grouped_by_length(order)
        shard = order[self.rank : self.total_size : self.num_replicas]
        if self.repeats > 1:
            shard = self._repeated(shard)
        skip = self.start_batch * self.batch_size if self.epoch == self.start_epoch else 0
        return iter(shard[skip:])

    def __len__(self) -> int:
        if self.repeats == 1:
            return self.num_samples
        return math.ceil(self.num_samples / self.batch_size) * self.batch_size * self.repeats

    def _repeated(self, shard: list[int]) -> list[int]:
        """`shard` cut into whole batches (the last one filled from the start), each `repeats` times in a
        row."""
        size = self.batch_size
        whole = shard + shard[: -len(shard) % size]
        return [
            i
            for start in range(0, len(whole), size)
            for _ in range(self.repeats)
            for i in whole[start : start + size]
        ]

    def _grouped_by_length(self, order: list[int]) -> list[int]:
        """HF Trainer's `group_by_length`: the shuffled order cut into megabatches of 50 global batches, each
        sorted by length, longest first; the megabatch holding the longest example goes first (so an
        out-of-memory error shows at once)."""
        size = 50 * self.batch_size * self.num_replicas
        megabatches = [
            sorted(order[i : i + size], key=lambda index: -self.lengths[index])
            for i in range(0, len(order), size)
        ]
        longest = max(range(len(megabatches)), key=lambda m: self.lengths[megabatches[m][0]])
        megabatches.insert(0, megabatches.pop(longest))
        return [index for megabatch in megabatches for index in megabatch]
