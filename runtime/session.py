"""One run lifecycle for every entrypoint (train.py, evaluate.py, every `python -m analysis.<x>`).

    with session.start(cfg, job_type="evaluate") as run:   # run dir, config.yaml, seed, loggers
        ...                                                 # load the model, do the work, run.log_*
        run.finish(results)                                 # results.json; headline numbers to every logger

The loggers are built before any model loads, so a logger config error costs seconds. Leaving the block,
normally, on an error or on Ctrl-C, ends the W&B run (exit code 1 when the block failed), so the next job of
a one-process `-m` sweep starts its own, and logs the run dir. `start_report` opens the same kind of session
for a report over a finished sweep (its summary table and figures), in the sweep's W&B group.

W&B naming: job_type train / evaluate / analysis / summary; group = the sweep dir of a `-m` run (every job
of one sweep in one group), else the task; the config is logged flat (`optim.lr`, `data.batch_size`), so a
dashboard's parallel coordinates and grouping work on the swept keys. A run resumed with `ckpt_path=`
continues the same W&B run: its id is kept in `<run dir>/wandb_run_id` and in every checkpoint.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning as L
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from lightning.pytorch.loggers import Logger, TensorBoardLogger, WandbLogger
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, OmegaConf

from figures import read_png
from runtime.loggers import print_config_tree, wandb_logger
from runtime.results import write_results
from runtime.validate import check
from runtime.wandb_runs import finish_wandb, sweep_group, wandb_run_id
from stats import item_scores

log = logging.getLogger(__name__)


@dataclass
class Session:
    """An open run: where it writes, what it logs to, and the W&B run id it continues."""

    run_dir: Path
    job_type: str
    loggers: list[Logger] = field(default_factory=list)
    config: dict[str, Any] = field(default_factory=dict)  # flat: {"optim.lr": 2e-4, ...}
    wandb_run_id: str | None = None
    _config_logged: bool = False

    def log_config(self) -> None:
        """Log the flat config to every logger but TensorBoard (which gets it with the final metrics), once.
        The first log_* call does it, so a W&B run starts only when this session logs (a driver such as the
        noise study runs whole train/evaluate jobs, each with its own W&B run, before it logs anything)."""
        if self._config_logged:
            return
        self._config_logged = True
        for logger in self.loggers:
            if not isinstance(logger, TensorBoardLogger):
                logger.log_hyperparams(self.config)

    def log_metrics(self, metrics: dict[str, float], step: int = 0) -> None:
        """Log scalar metrics to every logger."""
        self.log_config()
        for logger in self.loggers:
            logger.log_metrics(metrics, step=step)

    @rank_zero_only
    def log_table(self, key: str, rows: list[dict[str, Any]]) -> None:
        """A table (W&B; the other loggers have the run dir's files): every column whose values are
        scalars."""
        if not rows:
            return
        self.log_config()
        columns = [
            k
            for k in dict.fromkeys(k for row in rows for k in row)
            if all(isinstance(row.get(k), str | int | float | bool | type(None)) for row in rows)
        ]
        for logger in self._wandb():
            logger.log_table(key, columns=columns, data=[[row.get(c) for c in columns] for row in rows])

    @rank_zero_only
    def log_images(self, images: dict[str, Path]) -> None:
        """Figures (PNG files) as W&B images and TensorBoard images."""
        images = {key: Path(path) for key, path in images.items() if path is not None and Path(path).exists()}
        self.log_config()
        for logger in self.loggers:
            if isinstance(logger, WandbLogger):
                for key, path in images.items():
                    logger.log_image(key, images=[str(path)])
            elif isinstance(logger, TensorBoardLogger):
                for key, path in images.items():
                    logger.experiment.add_image(key, read_png(path), dataformats="HWC")

    def finish(self, results: dict[str, Any]) -> dict[str, Any]:
        """Write results.json (rank zero) and give every logger the run's final metrics with their intervals
        (`<metric>/ci_low`, `/ci_high`, `/n`): W&B summary, TensorBoard HParams (the flat config with
        `final/<metric>`); return the results with the run's identifiers added."""
        results = {**results, "job_type": self.job_type, "run_dir": str(self.run_dir)}
        if self.wandb_run_id:
            results["wandb_run_id"] = self.wandb_run_id
        if rank_zero_only.rank != 0:
            return results
        self.log_config()
        metrics = {**results.get("metrics", {}), **item_scores.flat(results.get("intervals", {}))}
        final = {k: float(v) for k, v in metrics.items() if isinstance(v, int | float)}
        for logger in self.loggers:
            if isinstance(logger, WandbLogger):
                logger.experiment.summary.update(final)
            elif isinstance(logger, TensorBoardLogger):
                finite = {f"final/{k}": v for k, v in final.items() if math.isfinite(v)}
                if finite:
                    logger.log_hyperparams(self.config, metrics=finite, step=results.get("global_step", 0))
        log.info("results: %s", write_results(self.run_dir, results))
        return results

    def _wandb(self) -> list[WandbLogger]:
        return [logger for logger in self.loggers if isinstance(logger, WandbLogger)]


@contextmanager
def start(cfg: DictConfig, job_type: str) -> Iterator[Session]:
    """Open a run of `cfg`: check its config (runtime/validate.py, the entrypoint's rules by `job_type`),
    create its dir, save the resolved config, seed, build (and so validate) its loggers."""
    check(cfg, job_type)
    run_dir = Path(cfg.paths.output_dir)
    write_config(cfg, run_dir)
    L.seed_everything(cfg.seed, workers=True)
    run_id = wandb_run_id(cfg, run_dir) if (cfg.get("logger") or {}).get("wandb") is not None else None
    session = Session(run_dir, job_type, build_loggers(cfg, job_type, run_id), flat_config(cfg), run_id)
    with _closing(session):
        yield session


@contextmanager
def start_report(
    sweep_dir: Path, logger_cfg: DictConfig | None, job_type: str, name: str
) -> Iterator[Session]:
    """A session for a report over a finished sweep: W&B only (when the sweep logged to W&B), in the sweep's
    group."""
    loggers: list[Logger] = []
    wandb_cfg = (logger_cfg or {}).get("wandb")
    if wandb_cfg is not None:
        loggers.append(
            wandb_logger(
                project=wandb_cfg.get("project", "lmlab"),
                entity=wandb_cfg.get("entity"),
                save_dir=str(sweep_dir),
                name=name,
                group=sweep_group(sweep_dir),
                job_type=job_type,
            )
        )
    session = Session(Path(sweep_dir), job_type, loggers, _config_logged=True)
    with _closing(session):
        yield session


@contextmanager
def _closing(session: Session) -> Iterator[None]:
    status = "failed"
    try:
        yield
        status = "success"
    finally:
        for logger in session.loggers:
            logger.finalize(status)
        finish_wandb(0 if status == "success" else 1)
        log.info("run dir: %s", session.run_dir)


def build_loggers(cfg: DictConfig, job_type: str, wandb_id: str | None) -> list[Logger]:
    """The loggers of `cfg.logger`; W&B gets the job type and the run id (a resumed run's id, resume="allow")
    where its config leaves them null."""
    loggers = []
    for name, conf in (cfg.get("logger") or {}).items():
        if conf is None:
            continue
        extra: dict[str, Any] = {}
        if name == "wandb":
            extra = {
                key: value
                for key, value in (("id", wandb_id), ("job_type", job_type))
                if conf.get(key) is None
            }
            extra["resume"] = "allow"
        loggers.append(instantiate(conf, **extra))
    return loggers


def metric_direction(metric: str) -> str:
    """`minimize` for losses and perplexities, else `maximize` (accuracy, Pass@1, BLEU): the sweeper's
    direction."""
    return (
        "minimize"
        if any(word in metric.lower() for word in ("loss", "perplexity", "ppl", "error"))
        else "maximize"
    )


def flat_config(cfg: DictConfig) -> dict[str, Any]:
    """The resolved config with dotted keys (`optim.lr`), lists kept as values."""
    flat: dict[str, Any] = {}

    def visit(prefix: str, value: Any) -> None:
        if isinstance(value, dict) and value:
            for key, child in value.items():
                visit(f"{prefix}.{key}" if prefix else str(key), child)
        else:
            flat[prefix] = value

    visit("", OmegaConf.to_container(cfg, resolve=True))
    return flat


@rank_zero_only
def write_config(cfg: DictConfig, run_dir: Path) -> None:
    """Create the run dir, print the config tree (if `print_config`) and save the resolved config."""
    run_dir.mkdir(parents=True, exist_ok=True)
    if cfg.get("print_config"):
        print_config_tree(cfg)
    OmegaConf.save(cfg, run_dir / "config.yaml", resolve=True)


def overrides() -> list[str]:
    """The command-line overrides of this Hydra job (empty outside Hydra)."""
    return list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else []


def optimized_value(results: dict[str, Any], metric: str) -> float:
    """The value of `metric` (the config's `optimized_metric`) among a run's metrics, for Hydra sweepers; NaN
    with a warning naming the metrics the run has when it has no such metric (a sweeper counts the job as
    failed, the other jobs go on)."""
    metrics = results.get("metrics", {})
    if metric not in metrics:
        log.warning(
            "optimized_metric=%r is not among this run's metrics (%s): returning NaN to the sweeper; results "
            "are in %s",
            metric,
            ", ".join(sorted(metrics)),
            results.get("run_dir"),
        )
        return float("nan")
    return float(metrics[metric])
