"""Random-number-generator state in checkpoints: every generator a run draws from (Python, NumPy, torch CPU
and CUDA) saved per rank, and restored on resume, so a resumed run draws what the uninterrupted one would."""

from __future__ import annotations

import logging
import random
from typing import Any

import lightning as L
import numpy as np
import torch

log = logging.getLogger(__name__)

RNG_KEY = "lmlab_rng_states"


def rng_states() -> dict[str, Any]:
    """This process's python, numpy, torch and CUDA RNG states, in types torch.load(weights_only=True)
    reads."""
    kind, keys, position, has_gauss, cached = np.random.get_state()
    states: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": {
            "kind": kind,
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "position": int(position),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def set_rng_states(states: dict[str, Any]) -> None:
    """Restore the RNG states `rng_states` returned."""
    version, internal, gauss = states["python"]
    random.setstate((version, tuple(internal), gauss))
    numpy = states["numpy"]
    np.random.set_state(
        (
            numpy["kind"],
            numpy["keys"].numpy().astype(np.uint32),
            numpy["position"],
            numpy["has_gauss"],
            numpy["cached_gaussian"],
        )
    )
    torch.set_rng_state(states["torch"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


class RestoreRNG(L.Callback):
    """Saves every rank's RNG states in each checkpoint and restores them right before the first training step
    after a resume, the point where an uninterrupted run draws its next random number (dropout)."""

    def __init__(self) -> None:
        self.pending: dict[str, Any] | None = None

    def on_save_checkpoint(
        self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        states = rng_states()
        if torch.distributed.is_available() and torch.distributed.is_initialized() and trainer.world_size > 1:
            gathered: list[Any] = [None] * trainer.world_size
            torch.distributed.all_gather_object(gathered, states)
        else:
            gathered = [states]
        checkpoint[RNG_KEY] = gathered

    def on_load_checkpoint(
        self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        saved = checkpoint.get(RNG_KEY)
        if not saved:
            log.warning(
                "the checkpoint holds no RNG states (written before lmlab saved them): dropout after resume "
                "differs from an uninterrupted run"
            )
            return
        if len(saved) != trainer.world_size:
            log.warning(
                "the checkpoint was written by %d processes, this run has %d: RNG states are not restored, "
                "so the resumed run is not bit-identical",
                len(saved),
                trainer.world_size,
            )
            return
        self.pending = saved[trainer.global_rank]

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if self.pending is not None:
            set_rng_states(self.pending)
            self.pending = None
