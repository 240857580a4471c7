"""W&B run identity: a run resumed with `ckpt_path=` continues the same W&B run (its id kept in
`<run dir>/wandb_run_id` and in every checkpoint), every job of a `-m` sweep in the sweep's group, and the run
ended at the end of each job."""

from __future__ import annotations

import secrets
import sys
from pathlib import Path
from typing import Any

import lightning as L
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig

WANDB_ID_FILE = "wandb_run_id"


CHECKPOINT_RUN_ID_KEY = "lmlab_wandb_run_id"


def wandb_run_id(cfg: DictConfig, run_dir: Path) -> str:
    """This run's W&B id: the interrupted run's when resuming (`ckpt_path`), the one rank zero already chose
    (DDP ranks share the run dir), else a new one; rank zero writes it to `<run dir>/wandb_run_id`."""
    path = run_dir / WANDB_ID_FILE
    run_id = (
        path.read_text().strip()
        if path.exists()
        else _resumed_run_id(cfg.get("ckpt_path")) or secrets.token_hex(4)
    )
    if rank_zero_only.rank == 0 and not path.exists():
        path.write_text(run_id + "\n")
    return run_id


def _resumed_run_id(ckpt_path: str | None) -> str | None:
    """The W&B id stored beside (`<run dir>/wandb_run_id`) or inside the checkpoint a run resumes from."""
    if not ckpt_path or not Path(ckpt_path).is_file():
        return None
    beside = Path(ckpt_path).resolve().parent.parent / WANDB_ID_FILE
    if beside.exists():
        return beside.read_text().strip()
    checkpoint = torch.load(ckpt_path, map_location="cpu", weights_only=True, mmap=True)
    return checkpoint.get(CHECKPOINT_RUN_ID_KEY) if isinstance(checkpoint, dict) else None


class RecordRunId(L.Callback):
    """Stores the W&B run id in every checkpoint, so a resume from a copied checkpoint still continues the
    run."""

    def __init__(self, run_id: str) -> None:
        self.run_id = run_id

    def on_save_checkpoint(
        self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        checkpoint[CHECKPOINT_RUN_ID_KEY] = self.run_id


def run_group(default: str) -> str:
    """The W&B group of this job: its sweep dir in a `-m` run (all jobs of a sweep in one group), else
    `default`."""
    if HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN:
        return sweep_group(Path(HydraConfig.get().runtime.output_dir).parent)
    return default


def sweep_group(sweep_dir: Path) -> str:
    """A sweep's W&B group name: its directory relative to the working directory (W&B allows 128
    characters)."""
    path = Path(sweep_dir).resolve()
    if path.is_relative_to(Path.cwd()):
        path = path.relative_to(Path.cwd())
    return path.as_posix()[-128:]


def finish_wandb(exit_code: int = 0) -> None:
    """End this process's W&B run, so the next job of a one-process sweep starts its own."""
    wandb = sys.modules.get("wandb")
    if wandb is not None and wandb.run is not None:
        wandb.finish(exit_code=exit_code)
