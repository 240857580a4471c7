"""Checkpoints a resumed run can trust.

- Writes are atomic: a temp file in the checkpoint's own directory, fsync, then `os.replace`; a failure (a
  kill, Ctrl-C, a full disk) removes the temp file and leaves the previous checkpoint as it was. Lightning's
  own writer stages in /tmp and moves the file, which truncates the target first when /tmp is another
  filesystem.
- Every RNG (python, numpy, torch CPU and CUDA) of every rank is saved and restored right before the first
  training step after a resume; the data position is the DataModule's (`TextDataModule.state_dict`).
- No checkpoint holds non-finite weights; when the loss turns non-finite at step k, a `last.ckpt` written with
  the weights of step k (their loss is that non-finite one) is rolled back to the one before it.
- Loading reads with `torch.load(weights_only=True)` and names the file when it is empty, truncated or
  corrupt.
"""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

import lightning as L
import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch.callbacks import ModelCheckpoint

from lightning_modules.base import NonFiniteLossError

log = logging.getLogger(__name__)

PREVIOUS_SUFFIX = ".previous"
TEMP_SUFFIX = ".partial"


class CheckpointError(RuntimeError):
    """A checkpoint file cannot be used; the message names the file."""


def write_atomically(path: str | os.PathLike, write: Callable[[IO[bytes]], None]) -> None:
    """Write `path` through `write(handle)` so that it holds either its old content or the complete new
    one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}{TEMP_SUFFIX}")
    try:
        with open(temporary, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)  # the rename itself survives a power loss
    finally:
        os.close(directory)


def remove_partial_files(directory: str | os.PathLike) -> list[Path]:
    """Delete temp files that a killed writer left in `directory` (their process is gone); return them."""
    removed = []
    for path in Path(directory).glob(f".*{TEMP_SUFFIX}"):
        pid = path.name.removesuffix(TEMP_SUFFIX).rsplit(".", 1)[-1]
        if pid.isdigit() and not _process_alive(int(pid)):
            path.unlink(missing_ok=True)
            removed.append(path)
    return removed


def load_checkpoint_file(path: str | os.PathLike, map_location: Any = None) -> dict[str, Any]:
    """A checkpoint read with weights_only=True; a missing, empty, truncated or corrupt file raises
    CheckpointError."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file (runs keep them in <run dir>/checkpoints)")
    hint = (
        f"Resume from another checkpoint in {path.parent} "
        f"(last.ckpt, {path.name}{PREVIOUS_SUFFIX} or best-*.ckpt)."
    )
    if path.stat().st_size == 0:
        raise CheckpointError(f"{path}: the checkpoint file is empty (0 bytes). {hint}")
    try:
        checkpoint = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as error:  # torch raises EOFError, RuntimeError or UnpicklingError for damaged files
        raise CheckpointError(
            f"{path}: not a readable checkpoint, truncated or corrupt ({type(error).__name__}: {error}). "
            f"{hint}"
        ) from error
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
        raise CheckpointError(f"{path}: not a Lightning checkpoint (no state_dict). {hint}")
    return checkpoint


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning checkpoint IO with atomic writes and weights-only, file-naming loads."""

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None
    ) -> None:
        write_atomically(path, lambda handle: torch.save(checkpoint, handle))

    def load_checkpoint(
        self, path: Any, map_location: Any | None = None, weights_only: bool | None = None
    ) -> dict[str, Any]:
        return load_checkpoint_file(path, map_location)


class SafeModelCheckpoint(ModelCheckpoint):
    """ModelCheckpoint that writes no non-finite weights or monitored value, and keeps the file it overwrites
    as `<name>.previous`: an unmonitored checkpoint's weights are known good only once they gave a finite
    loss."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.written: dict[Path, int] = {}  # file -> global step of the weights it holds

    def _save_checkpoint(self, trainer: L.Trainer, filepath: str) -> None:
        monitored = trainer.callback_metrics.get(self.monitor) if self.monitor else None
        weights = [p for p in trainer.lightning_module.parameters() if p.requires_grad]
        if (monitored is not None and not torch.isfinite(monitored)) or not all(
            torch.isfinite(p).all() for p in weights
        ):
            log.warning(
                "not writing %s at step %d: the weights or %s are not finite",
                filepath,
                trainer.global_step,
                self.monitor,
            )
            return
        path = Path(filepath)
        # rank 0 decides (and its answer reaches every rank, so all of them meet at the barrier): a sharded
        # (FSDP) checkpoint is a directory every rank writes into, and rank 0 moves the old one away first
        if path in self.written and trainer.strategy.broadcast(path.exists()):
            previous = path.with_name(path.name + PREVIOUS_SUFFIX)
            if trainer.is_global_zero:
                _keep_previous(path, previous)
            self.written[previous] = self.written[path]
            trainer.strategy.barrier()
        super()._save_checkpoint(trainer, filepath)
        self.written[path] = trainer.global_step

    def on_exception(
        self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException
    ) -> None:
        if not isinstance(exception, NonFiniteLossError) or not trainer.is_global_zero:
            return
        # the weights of step k gave the non-finite loss: undo files written at step k
        if self.monitor is None:
            for path in [
                p
                for p, step in self.written.items()
                if step >= exception.step and not p.name.endswith(PREVIOUS_SUFFIX)
            ]:
                self._roll_back(path)

    def last_good(self, failed_step: int) -> tuple[int, Path] | None:
        """(global step, file) of the newest checkpoint this callback holds from before `failed_step`."""
        good = [(step, path) for path, step in self.written.items() if step < failed_step and path.exists()]
        return max(good, default=None)

    def _roll_back(self, path: Path) -> None:
        """Replace `path` with the file it overwrote, or delete it when there is none."""
        previous = path.with_name(path.name + PREVIOUS_SUFFIX)
        if previous.exists():
            _remove(path)
            os.replace(previous, path)
            self.written[path] = self.written.pop(previous)
            log.warning(
                "%s held the weights whose loss was not finite: restored the checkpoint it replaced", path
            )
        else:
            _remove(path)
            self.written.pop(path)
            log.warning("deleted %s: it held the weights whose loss was not finite", path)


def _keep_previous(path: Path, previous: Path) -> None:
    """Keep `path` as `previous` before it is overwritten. A file: a copy, so `path` stays whole until the new
    file replaces it. A sharded checkpoint (a directory, rewritten in place): moved, so the new one starts
    empty."""
    if path.is_dir():
        _remove(previous)
        os.replace(path, previous)
    else:
        _keep_copy(path, previous)


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


def _keep_copy(path: Path, copy: Path) -> None:
    """Make `copy` hold `path`'s current content: a hard link (free), or a real copy where links are not
    supported."""
    staging = copy.with_name(f".{copy.name}.{os.getpid()}{TEMP_SUFFIX}")
    staging.unlink(missing_ok=True)
    try:
        os.link(path, staging)
    except OSError:
        shutil.copy2(path, staging)
    os.replace(staging, copy)


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def with_checkpoints(error: NonFiniteLossError, trainer: L.Trainer) -> NonFiniteLossError:
    """`error` again, with the run's checkpoint dir and the last good checkpoint any SafeModelCheckpoint of
    `trainer` holds (after their rollback of the files the non-finite step wrote)."""
    callbacks = [c for c in trainer.callbacks if isinstance(c, SafeModelCheckpoint)]
    directory = next((Path(c.dirpath) for c in reversed(callbacks) if c.dirpath), None)
    good = [found for c in callbacks if (found := c.last_good(error.step)) is not None]
    return NonFiniteLossError(error.loss, error.step, error.batch_idx, directory, max(good, default=None))
