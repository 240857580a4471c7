"""The DataModule of a train.py run: it holds the run's task (datamodules/task.py), tokenizes the splits a
Trainer stage needs, and batches them: seeded order that resumes mid-epoch, its own loader RNG.
"""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader, Sampler

from datamodules import padding_free
from datamodules.sampling import EpochSeededSampler
from datamodules.task import Task


def batch_size(batch: dict[str, torch.Tensor] | list[dict[str, Any]]) -> int:
    """Number of examples in a collated batch, padded or packed, or of prompts in a batch of prompts (for
    Lightning's ThroughputMonitor)."""
    return len(batch) if isinstance(batch, list) else padding_free.sequences(batch)


def batch_tokens(batch: dict[str, torch.Tensor] | list[dict[str, Any]]) -> int:
    """Tokens of a collated batch that are not padding, or the prompt tokens of a batch of prompts
    (ThroughputMonitor's items: tokens/s)."""
    if isinstance(batch, list):
        return sum(len(example["prompt_ids"]) for example in batch)
    return int(batch["input_ids"].numel() if padding_free.is_packed(batch) else batch["attention_mask"].sum())


def stage_splits(stage: str | None) -> list[str]:
    """The splits a Trainer stage reads (all three for none)."""
    return {"fit": ["train", "val"], "validate": ["val"], "test": ["test"]}.get(
        stage or "", ["train", "val", "test"]
    )


class TextDataModule(L.LightningDataModule):
    """Batches of one task's tokenized examples for the Trainer."""

    def __init__(
        self,
        task: Task,
        batch_size: int = 4,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        group_by_length: bool = False,
    ) -> None:
        super().__init__()
        self.task = task
        self.batch_size, self.eval_batch_size = batch_size, eval_batch_size or batch_size
        self.num_workers, self.group_by_length = num_workers, group_by_length
        self.datasets: dict[str, list[dict[str, Any]]] = {}
        # (epoch, batches done) to continue from, restored from a checkpoint by load_state_dict
        self.resume_position = (0, 0)
        self.train_sampler: EpochSeededSampler | None = None
        self.batch_repeats = 1  # each training batch comes this many times in a row (EpochSeededSampler)

    def setup(self, stage: str | None = None) -> None:
        """Prepare the examples of the splits the Trainer stage needs, each split once."""
        for split in stage_splits(stage):
            if split not in self.datasets:
                self.datasets[split] = self.examples(split)

    def examples(self, split: str) -> list[Any]:
        """The examples of `split` as this DataModule batches them: the task's tokenized records."""
        return self.task.tokenize_all(self.task.records(split), split)

    def train_dataloader(self) -> DataLoader:
        data = self.datasets["train"]
        trainer = self.trainer
        epoch, batch = self.resume_position
        sampler = EpochSeededSampler(
            len(data),
            self.task.seed,
            num_replicas=trainer.world_size if trainer else 1,
            rank=trainer.global_rank if trainer else 0,
            batch_size=self.batch_size,
            start_epoch=epoch,
            start_batch=batch,
            lengths=[len(example["input_ids"]) for example in data] if self.group_by_length else None,
            repeats=self.batch_repeats,
        )
        self.train_sampler = sampler
        return self._loader(data, self.batch_size, sampler, sampler.loader_generator)

    def state_dict(self) -> dict[str, int]:
        """Where training stands in the data order (saved in every checkpoint): the epoch and its batches
        done."""
        trainer = self.trainer
        if trainer is None:
            return {}
        return {
            "epoch": trainer.current_epoch,
            "batches_done": trainer.fit_loop.epoch_loop.batch_progress.current.processed,
        }

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Continue the data order where a checkpoint left it (the next train_dataloader starts there)."""
        if state:
            self.resume_position = (int(state["epoch"]), int(state["batches_done"]))
            # FSDP restores after setup, which built the loader for the LR schedule
            if self.train_sampler is not None:
                self.train_sampler.resume_at(*self.resume_position)

    def _loader(
        self,
        data: list[dict[str, Any]],
        batch_size: int,
        sampler: Sampler[int] | None = None,
        generator: torch.Generator | None = None,
    ) -> DataLoader:
        # creating an iterator draws a worker seed from the loader's generator: never from the global RNG
        return DataLoader(
            data,
            batch_size=batch_size,
            sampler=sampler,
            collate_fn=self.collate,
            num_workers=self.num_workers,
            generator=generator if generator is not None else torch.Generator().manual_seed(self.task.seed),
        )

    def collate(self, examples: list[dict[str, Any]]) -> Any:
        """A batch of `examples`: the task's collation."""
        return self.task.collate(examples)

    def val_dataloader(self) -> DataLoader:
        return self._eval_loader("val")

    def test_dataloader(self) -> DataLoader:
        return self._eval_loader("test")

    def _eval_loader(self, split: str) -> DataLoader:
        return self._loader(self.datasets[split], self.eval_batch_size)
