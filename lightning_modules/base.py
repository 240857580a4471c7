"""What every lmlab LightningModule shares: AdamW + warmup/cosine, the gradient-norm log, gradients freed
right after each optimiser step, a trained tied embedding's gradient sent sparse (modeling/tied_embedding.py),
frozen-base checkpoints."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.plugins.precision import MixedPrecision
from lightning.pytorch.strategies import FSDPStrategy
from omegaconf import DictConfig
from torch.utils._foreach_utils import _get_fused_kernels_supported_devices
from transformers import get_cosine_schedule_with_warmup

from lightning_modules.methods import LR_RATIO_ATTR, training_hooks
from modeling.flops import flop_counts
from modeling.model_checks import BASE_IDENTITY_ATTR, ModelLoadError, check_same_base
from modeling.tied_embedding import dense_gradient, sparse_tied_gradient

# the training checkpoint's entry for the state of a method that acts during training (TrainingHooks)
METHOD_STATE_KEY = "method_state"


class NonFiniteLossError(FloatingPointError):
    """The training loss became NaN or infinite at global step `step`. Raised here without knowing the run's
    checkpoints; the run (runtime/training.py) raises it again with the checkpoint dir and the last good
    checkpoint, (global step, file), so the message says where to resume from."""

    def __init__(
        self,
        loss: float,
        step: int,
        batch_idx: int,
        checkpoint_dir: Path | None = None,
        good_checkpoint: tuple[int, Path] | None = None,
    ) -> None:
        super().__init__(loss, step, batch_idx)
        self.loss, self.step, self.batch_idx = loss, step, batch_idx
        self.checkpoint_dir, self.good_checkpoint = checkpoint_dir, good_checkpoint

    def __str__(self) -> str:
        if self.good_checkpoint is not None:
            step, path = self.good_checkpoint
            resume = f"The last good checkpoint is {path} (step {step}); resume with ckpt_path={path}."
        elif self.checkpoint_dir is not None:
            resume = (
                f"No good checkpoint was written before this step (in {self.checkpoint_dir}); "
                "nothing to resume from."
            )
        else:
            resume = "No checkpoint callback is configured; nothing to resume from."
        return (
            f"training loss is {self.loss} at global step {self.step} (batch {self.batch_idx}). Stopped. "
            f"{resume} Try a lower optim.lr or trainer.precision=32-true."
        )


def module_settings(cfg: DictConfig) -> dict[str, Any]:
    """The constructor keywords every task module takes from a train.py config: `optim.*` and
    `metrics.every_n_steps`."""
    every = cfg.metrics.every_n_steps
    if not isinstance(every, int) or every < 1:
        raise ValueError(f"metrics.every_n_steps={every!r}: expected an integer >= 1")
    return {**cfg.optim, "metrics_every_n_steps": every}


def adamw_kernel(parameters: list[torch.Tensor], amp_clips: bool = False) -> dict[str, bool]:
    """AdamW's fastest correct implementation for `parameters`: `fused` (one kernel for every tensor, HF
    Trainer's default) when all are floating-point tensors on a device that has the fused kernel (CPU, CUDA,
    MPS, XPU, ...), else `foreach` (one batched op per step over the tensor list, not a Python loop).
    `foreach` also when Lightning's mixed precision clips gradients (`amp_clips`): it refuses to clip for an
    optimiser that unscales gradients inside its fused step."""
    devices = set(_get_fused_kernels_supported_devices())
    fusable = all(p.is_floating_point() and not p.is_sparse and p.device.type in devices for p in parameters)
    return {"fused": True} if fusable and parameters and not amp_clips else {"foreach": True}


class OptimisedModule(L.LightningModule):
    """Base of the task modules: optimiser and schedule from `optim.*`; checkpoints keep only trainable
    weights when the backbone is frozen (a LoRA checkpoint is the LoRA weights). Training metrics beyond the
    loss (and the gradient norm) are computed on every `metrics_every_n_steps`-th optimiser step only."""

    # whether every training step's loss reads the backbone's output layer (a tied embedding's gradient can
    # then be sent sparse: modeling/tied_embedding.py)
    loss_reads_output_layer = True

    def __init__(
        self,
        backbone: torch.nn.Module,
        lr: float,
        weight_decay: float,
        betas: tuple[float, float],
        warmup_ratio: float,
        metrics_every_n_steps: int = 1,
    ) -> None:
        super().__init__()
        self.lr, self.weight_decay, self.warmup_ratio = lr, weight_decay, warmup_ratio
        self.betas = tuple(betas)
        self.metrics_every_n_steps = metrics_every_n_steps
        self.base_is_frozen = any(not p.requires_grad for p in backbone.parameters())
        self.strict_loading = not self.base_is_frozen
        self.base_model_identity = getattr(backbone, BASE_IDENTITY_ATTR, None)
        self.allow_base_mismatch = False
        # what the last step's `batch_flops` reads (its batch, ...): set by each step, read only if asked
        self.counted: tuple[Any, ...] | None = None
        self.sparse_embedding = False  # whether fit start switched a tied embedding's gradient to sparse

    def setup(self, stage: str) -> None:
        """Read what the backbone's FLOPs per token depend on (`flop_counts`, for `flops_per_batch`), before
        a strategy wraps or shards it."""
        self.flop_counts = flop_counts(self.model)

    @property
    def flops_per_batch(self) -> int | None:
        """FLOPs of the last batch (the ThroughputMonitor's FLOP/s and MFU), counted when read, after the
        step: nothing is counted, and the device is not waited on, for a run that does not ask. A module
        keeps its last batch's arguments to `batch_flops` in `counted` at each step."""
        if self.counted is None or not hasattr(self, "flop_counts"):
            return None
        return self.batch_flops(*self.counted)

    def batch_flops(self, *counted: Any) -> int:
        """FLOPs of one batch from what the module kept of it (`counted`); each module counts its own."""
        raise NotImplementedError

    def parameter_groups(self) -> list[dict[str, Any]]:
        """The trainable parameters in AdamW groups: weight decay on those of 2 or more dimensions only, and
        each at the learning rate its method asks for (`LR_RATIO_ATTR`: LoRA+ trains B at a multiple)."""
        ratios = getattr(self.model, LR_RATIO_ATTR, None) or {}
        groups: dict[tuple[bool, float], list[torch.Tensor]] = {}
        for name, parameter in self.named_parameters():
            if parameter.requires_grad:
                ratio = next((value for part, value in ratios.items() if part in name), 1.0)
                groups.setdefault((parameter.ndim >= 2, ratio), []).append(parameter)
        order = sorted(groups, key=lambda key: (not key[0], key[1]))  # decayed first, as AdamW's state was
        return [
            {"params": groups[decay, ratio], "weight_decay": self.weight_decay * decay, "lr": self.lr * ratio}
            for decay, ratio in order
        ]

    def configure_optimizers(self) -> dict[str, Any]:
        """AdamW over the trainable parameters (`parameter_groups`; fused or foreach: `adamw_kernel`), linear
        warmup then cosine decay per step."""
        groups = self.parameter_groups()
        amp_clips = isinstance(self.trainer.precision_plugin, MixedPrecision) and bool(
            self.trainer.gradient_clip_val
        )
        optimizer = torch.optim.AdamW(
            groups,
            lr=self.lr,
            betas=self.betas,
            **adamw_kernel([p for group in groups for p in group["params"]], amp_clips),
        )
        total = max(1, int(self.trainer.estimated_stepping_batches))
        scheduler = get_cosine_schedule_with_warmup(optimizer, int(self.warmup_ratio * total), total)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def _shared_step(self, batch: dict[str, torch.Tensor], stage: str) -> torch.Tensor:
        """The loss of `batch` at `stage` (train, val, test), its metrics logged: each task module's own."""
        raise NotImplementedError

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss = self._shared_step(batch, "train")
        regulariser = training_hooks(self.model).regulariser()
        if regulariser is None:
            return loss
        self.log("train/method_regulariser", regulariser.detach(), on_step=True, on_epoch=True)
        return loss + regulariser

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self._shared_step(batch, "val")

    def test_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self._shared_step(batch, "test")

    def measures_step(self) -> bool:
        """Whether this training step computes the metrics beyond the loss (every `metrics_every_n_steps`)."""
        return self.global_step % self.metrics_every_n_steps == 0

    def log_measured(self, metrics: dict[str, torch.Tensor]) -> None:
        """Step values of a measured step, straight to the loggers: `self.log(on_step=True)` would repeat the
        last value on every unmeasured step that follows."""
        values = {name: float(value) for name, value in metrics.items()}
        for logger in self.loggers:
            logger.log_metrics(values, step=self.global_step)

    def on_before_backward(self, loss: torch.Tensor) -> None:
        """Stop on a NaN/inf training loss before it reaches the weights (NonFiniteLossError)."""
        if not torch.isfinite(loss):
            raise NonFiniteLossError(
                loss.item(), self.global_step, self.trainer.fit_loop.epoch_loop.batch_idx
            )

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        if not self.measures_step():
            return
        gradients = [p.grad for p in self.parameters() if p.grad is not None]
        # a rank may hold no shard, yet must join the sum
        sharded = isinstance(self.trainer.strategy, FSDPStrategy)
        if not gradients and not sharded:
            return
        norm = torch.nn.utils.get_total_norm(gradients) if gradients else torch.zeros(())
        if sharded:  # each rank holds a shard: sum the squares over ranks
            norm = self.trainer.strategy.reduce(norm.square(), reduce_op="sum").sqrt()
        self.log_measured({"train/grad_norm": norm})

    def optimizer_step(
        self,
        epoch: int,
        batch_idx: int,
        optimizer: Any,
        optimizer_closure: Callable[[], Any] | None = None,
    ) -> None:
        """The optimiser step, then the gradients freed at once, as HF Trainer and a hand-written loop do.
        Lightning alone would free them only after the next step's forward, so that forward would hold a
        model-sized set of gradients beside its activations in full fine-tuning."""
        super().optimizer_step(epoch, batch_idx, optimizer, optimizer_closure)
        training_hooks(self.model).after_optimizer_step(self.global_step)
        optimizer.zero_grad(set_to_none=True)

    def on_fit_start(self) -> None:
        """Tell the method how many optimiser steps training takes (AdaLoRA's budget schedule); send a trained
        tied embedding's gradient sparse where the loss reads the output layer."""
        training_hooks(self.model).on_fit_start(max(1, int(self.trainer.estimated_stepping_batches)))
        self.sparse_embedding = self.loss_reads_output_layer and sparse_tied_gradient(self.model)

    def on_fit_end(self) -> None:
        """Send a tied embedding's gradient dense again; let the method write what it reports (AdaLoRA's
        final rank map) into its run dir."""
        if self.sparse_embedding:
            dense_gradient(self.model)
        if self.trainer.is_global_zero:
            training_hooks(self.model).on_fit_end()

    def configure_gradient_clipping(
        self,
        optimizer: torch.optim.Optimizer,
        gradient_clip_val: float | None = None,
        gradient_clip_algorithm: str | None = None,
    ) -> None:
        """Clip by the global norm; under FSDP through the sharded module (Lightning's FSDP precision refuses
        `gradient_clip_algorithm='norm'`, and a per-shard norm would be wrong)."""
        if isinstance(self.trainer.strategy, FSDPStrategy) and gradient_clip_val:
            if gradient_clip_algorithm not in (None, "norm"):
                raise ValueError(
                    f"trainer.gradient_clip_algorithm={gradient_clip_algorithm!r}: FSDP clips by norm only"
                )
            self.trainer.model.clip_grad_norm_(gradient_clip_val)
            return
        self.clip_gradients(optimizer, gradient_clip_val, gradient_clip_algorithm)

    def write_extras(self, target: Path) -> None:
        """Save what this module adds to its model beside a saved run's weights in `target` (nothing here; a
        classifier's head)."""

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Record the base model the trained weights belong to, and the state of a method that acts during
        training."""
        checkpoint[BASE_IDENTITY_ATTR] = self.base_model_identity
        checkpoint[METHOD_STATE_KEY] = training_hooks(self.model).state_dict()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Refuse a checkpoint of another base model (unless allow_base_mismatch)."""
        check_same_base(
            checkpoint.get(BASE_IDENTITY_ATTR),
            self.base_model_identity,
            "the checkpoint (ckpt_path)",
            self.allow_base_mismatch,
        )
        training_hooks(self.model).load_state_dict(checkpoint.get(METHOD_STATE_KEY) or {})

    def load_state_dict(
        self, state_dict: Mapping[str, Any], strict: bool = True, assign: bool = False
    ) -> Any:
        """Load weights; with a frozen base (strict loading off) every saved key must be used and every
        trainable weight present, so an adapter never half-loads onto a different model."""
        result = super().load_state_dict(state_dict, strict=strict, assign=assign)
        if self.base_is_frozen:
            missing = sorted(
                {name for name, p in self.named_parameters() if p.requires_grad} - set(state_dict)
            )
            if result.unexpected_keys or missing:
                raise ModelLoadError(
                    f"checkpoint weights do not fit this model: unused {sorted(result.unexpected_keys)[:3]}, "
                    f"missing trainable {missing[:3]}"
                )
        return result

    def state_dict(self, *args: Any, **kwargs: Any) -> dict[str, torch.Tensor]:
        """Everything when all parameters train; only the trainable ones when the backbone is frozen."""
        state = super().state_dict(*args, **kwargs)
        if not self.base_is_frozen:
            return state
        prefix = kwargs.get("prefix", "")
        trainable = {prefix + name for name, p in self.named_parameters() if p.requires_grad}
        return {key: value for key, value in state.items() if key in trainable}
