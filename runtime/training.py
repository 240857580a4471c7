"""The training run behind train.py: build model, method, data, module and Trainer; fit, test, save."""

from __future__ import annotations

import logging
import math
import warnings
from pathlib import Path
from typing import Any

import lightning as L
import torch
from hydra.utils import instantiate
from lightning.pytorch.loggers import Logger
from omegaconf import DictConfig
from transformers import PreTrainedModel, PreTrainedTokenizerBase

import datamodules
from datamodules.base import TextDataModule
from datamodules.task import Task
from lightning_modules import methods
from lightning_modules.base import NonFiniteLossError
from lightning_modules.methods import MethodContext, count_parameters
from lightning_modules.task_modules import task_module_class, task_module_name
from modeling import model_checks, models
from modeling.architecture import bare_model
from modeling.padding_free import keeps_sequences_apart
from runtime import saved_run
from runtime.checkpointing import AtomicCheckpointIO, remove_partial_files, with_checkpoints
from runtime.rng_state import RestoreRNG
from runtime.session import overrides, start
from runtime.wandb_runs import RecordRunId

log = logging.getLogger(__name__)

# lmlab's DataModules restore the data position themselves (TextDataModule.state_dict): Lightning's warning
# that a mid-epoch resume replays batches does not apply to them
warnings.filterwarnings(
    "ignore", message="You're resuming from a checkpoint that ended before the epoch ended"
)


def build_trainable_model(
    cfg: DictConfig,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase, L.LightningDataModule, dict[str, float]]:
    """Build `cfg.model` and the task's DataModule, and turn the model into the trainable one with
    `cfg.method`; also return the metrics the method reports (e.g. svd_lora's ranks)."""
    model, tokenizer = models.build(cfg.model, cache_dir=cfg.paths.cache_dir)
    identity = model_checks.base_identity(model, cfg.model)
    datamodule = datamodules.build(cfg, tokenizer)
    if datamodule.task.renders_chat:  # as its examples were rendered (a chat template or not), so evaluation
        # and the analyses of its export render prompts the same way under prompt.chat_template=auto
        identity["config"]["chat"] = datamodule.task.chat_style is not None
    # an objective beyond SFT batches prompts or pairs (and pads what it builds from them); a method that
    # initialises from data reads the task's supervised examples
    own_batches = bool((cfg.get("objective") or {}).get("module"))
    examples = TextDataModule(datamodule.task, batch_size=cfg.data.batch_size) if own_batches else datamodule
    context = MethodContext(cfg.model, tokenizer, examples, Path(cfg.paths.output_dir))
    model = methods.build(cfg.method)(model, context)
    setattr(model, model_checks.BASE_IDENTITY_ATTR, identity)  # recorded in every checkpoint and export
    datamodule.task.padding_free = not own_batches and padding_free(model, datamodule.task)
    model.train()  # from_pretrained leaves eval mode (dropout off); training needs train mode
    return model, tokenizer, datamodule, context.metrics


def padding_free(model: PreTrainedModel, task: Task) -> bool:
    """Padding-free batches where `data.padding_free` asks for them, the task's examples allow them and the
    model keeps packed examples apart; one log line where a run pads instead."""
    if not task.padding_free_requested:
        return False
    if not task.allows_padding_free:
        log.info("data.padding_free: %s batches are padded (its batches do not pack)", type(task).__name__)
        return False
    if not keeps_sequences_apart(model):
        log.info(
            "data.padding_free: %s does not keep packed examples apart (it ignores position ids, or the "
            "method drops them): batches are padded",
            type(bare_model(model)).__name__,
        )
        return False
    return True


def build_trainer(
    cfg: DictConfig, model: PreTrainedModel, loggers: list[Logger], wandb_run_id: str | None = None
) -> L.Trainer:
    """The Lightning Trainer of `cfg.trainer`, with the configured callbacks and the session's loggers."""
    callbacks = [instantiate(c) for c in (cfg.get("callbacks") or {}).values() if c is not None]
    callbacks.append(RestoreRNG())  # exact resume is not optional: every checkpoint carries the RNG states
    if wandb_run_id:
        callbacks.append(RecordRunId(wandb_run_id))
    extra: dict[str, Any] = {}
    strategy = cfg.trainer.get("strategy")
    if isinstance(strategy, DictConfig):  # a strategy factory that needs the model (FSDP wrap units)
        extra["strategy"] = instantiate(strategy)(model)
    return instantiate(
        cfg.trainer, callbacks=callbacks, logger=loggers or False, plugins=[AtomicCheckpointIO()], **extra
    )


def trainable_module(cfg: DictConfig) -> L.LightningModule:
    """The task module of `cfg` around a freshly built trainable model (an FSDP run's unsharded copy for
    export)."""
    model, _, datamodule, _ = build_trainable_model(cfg)
    return task_module_class(task_module_name(cfg)).from_config(model, cfg, datamodule.task)


def run(cfg: DictConfig) -> dict[str, Any]:
    """Train, test and save one run; return (and write to results.json) its final metrics."""
    with start(cfg, job_type="train") as session:
        model, tokenizer, datamodule, method_metrics = build_trainable_model(cfg)
        check_data(cfg, datamodule)
        module = task_module_class(task_module_name(cfg)).from_config(model, cfg, datamodule.task)
        module.allow_base_mismatch = bool(cfg.get("allow_base_mismatch"))
        if cfg.get("ckpt_path"):
            for path in remove_partial_files(Path(cfg.ckpt_path).parent):
                log.info("removed %s, a partial checkpoint write of a killed run", path)
        trainable, total = count_parameters(module)
        log.info(
            "trainable params: %s / %s (%.4f%%)", f"{trainable:,}", f"{total:,}", 100 * trainable / total
        )
        trainer = build_trainer(cfg, model, session.loggers, session.wandb_run_id)
        session.log_config()
        if not cfg.get("ckpt_path"):  # a resumed run logged these at step 0 already
            session.log_metrics({"params/trainable": trainable, "params/total": total, **method_metrics})
        try:
            trainer.fit(module, datamodule=datamodule, ckpt_path=cfg.get("ckpt_path"))
        except NonFiniteLossError as error:
            raise with_checkpoints(error, trainer) from error
        results = {
            "run_name": cfg.run_name,
            "model": cfg.model.name,
            "task": cfg.task.name,
            "method": cfg.method.name,
            "objective": (cfg.get("objective") or {}).get("name", "sft"),
            "overrides": overrides(),
            "optimized_metric": cfg.optimized_metric,
            "global_step": trainer.global_step,
            "trainable_params": trainable,
            "total_params": total,
            "trainable_share": trainable / total,
            "padding_free": datamodule.task.padding_free,
            **divergence(module, cfg.divergence_max_abs_weight),
            "metrics": {key: float(value) for key, value in trainer.callback_metrics.items()},
        }
        if results["diverged"]:
            log.warning(
                "RUN DIVERGED: %s. Its metrics and final/ are not a trained model; results.json says "
                "diverged: true. Lower optim.lr.",
                results["divergence_reason"],
            )
        # before any later stage
        final_dir = saved_run.write_final(
            trainer,
            module,
            cfg.method,
            tokenizer,
            session.run_dir / "final",
            unsharded=lambda: trainable_module(cfg),
        )
        if trainer.is_global_zero:
            results["final_dir"] = final_dir
        if cfg.test_after_fit:
            try:
                results["tested"] = test(cfg, trainer, module, datamodule)
            except Exception:
                log.error(
                    "the test stage failed after training; the trained weights are exported to %s",
                    session.run_dir / "final",
                )
                raise
            results["metrics"].update({key: float(value) for key, value in trainer.callback_metrics.items()})
        return session.finish(results)


def test(
    cfg: DictConfig, trainer: L.Trainer, module: L.LightningModule, datamodule: L.LightningDataModule
) -> dict[str, Any]:
    """`trainer.test` on the weights `test_ckpt` names: `last` (as training ended) or `best` (the checkpoint
    with the lowest validation loss); return which weights were measured."""
    if cfg.test_ckpt == "last":
        trainer.test(module, datamodule=datamodule)
        return {"weights": "last", "global_step": trainer.global_step}
    best = next((c for c in trainer.checkpoint_callbacks if c.monitor and c.best_model_path), None)
    if best is None:
        raise ValueError(
            "test_ckpt=best: no best-by-validation checkpoint was written (no validation ran, or "
            "callbacks.model_checkpoint is off); use test_ckpt=last"
        )
    path = best.best_model_path
    trainer.test(module, datamodule=datamodule, ckpt_path=path)
    return {
        "weights": "best",
        "checkpoint": path,
        "global_step": getattr(best, "written", {}).get(Path(path)),
        best.monitor: float(best.best_model_score),
    }


def check_data(cfg: DictConfig, datamodule: L.LightningDataModule) -> None:
    """Fail before training when a split the run needs has no usable example (the message names the cause)."""
    datamodule.setup("fit")
    if cfg.test_after_fit:
        datamodule.setup("test")
        if not datamodule.datasets["test"]:
            raise ValueError(
                f"task '{cfg.task.name}': the test split has no examples, so test_after_fit=true would "
                "report no test metrics; point task.data_files.test at a non-empty file or set "
                "test_after_fit=false"
            )


def divergence(module: L.LightningModule, max_abs_weight: float) -> dict[str, Any]:
    """`diverged` (and why) when the trainable weights are not finite or larger than `max_abs_weight`."""
    local = max(
        (p.detach().abs().max().item() for p in module.parameters() if p.requires_grad and p.numel()),
        default=0.0,
    )
    largest = float(local)
    # FSDP: each rank holds a shard
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        largest = float(
            module.trainer.strategy.reduce(torch.tensor(local), reduce_op=torch.distributed.ReduceOp.MAX)
        )
    report: dict[str, Any] = {"diverged": False, "max_abs_trainable_weight": largest}
    if not math.isfinite(largest):
        report |= {"diverged": True, "divergence_reason": "trainable weights are not finite"}
    elif largest > max_abs_weight:
        report |= {
            "diverged": True,
            "divergence_reason": f"a trainable weight reached {largest:.3g} "
            f"(> divergence_max_abs_weight={max_abs_weight:g})",
        }
    return report
