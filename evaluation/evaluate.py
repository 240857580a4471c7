"""The evaluation run behind evaluate.py: load the model (base or `ckpt=`), score it on a task's test split
with the scorer its task asks for (`evaluation_kind`: generation or classification), write the results:
per-item outcomes (predictions.jsonl, with item ids), metrics.json and results.json, every metric with its
interval (conf/statistics, docs/statistics.md).

With `judge=openai_compatible`, an LLM judge also scores every prediction (evaluation/judge.py):
`judge_accuracy` and its agreement with exact match are reported beside the automatic metrics.
A `-m` grid of runs is summarised by `evaluation.task_grid.EvaluationGrid`.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from omegaconf import DictConfig, OmegaConf

import datamodules
from evaluation import data_parallel, journal, predictions, vllm_backend
from evaluation.judge import judge_rows
from evaluation.loaded import load
from evaluation.scorers import scorer
from evaluation.task_grid import headline_metric
from runtime import saved_run
from runtime.session import overrides, start
from stats import item_scores

log = logging.getLogger(__name__)


# what a run evaluates, by the layout of its saved run (runtime/saved_run.py): the base model, a fine-tuned
# one or a MEMIT-edited one; a grid's tables are written per stage
STAGES = {"base": "zero_shot", "adapter": "sft", "method": "sft", "whole": "sft", "edit": "edited"}


def run(cfg: DictConfig) -> dict[str, Any]:
    """Evaluate one (model, task, checkpoint); write predictions.jsonl, metrics.json and results.json."""
    choice = saved_run.resolve(cfg)
    with start(cfg, job_type="evaluate") as session:
        loaded = load(choice, cfg)
        task = datamodules.build_task(cfg, loaded.tokenizer)
        if loaded.model is None:
            vllm_backend.check(cfg, task.evaluation_kind)
        records = _nonempty(task.limited(task.evaluation_records(), cfg.get("limit")), cfg)
        kind = scorer(task.evaluation_kind)
        unit = kind.batch_size(cfg)
        finished = journal.start(cfg, choice, session.run_dir)
        outputs = data_parallel.gathered(
            cfg, kind.outputs, unit, loaded, task, records, session.run_dir, finished
        )
        rows, metrics, intervals = kind.score(cfg, task, records, outputs, session.run_dir)
        if cfg.get("judge") and rows:
            exact = [k for k in rows[0] if k.startswith("exact_match_")]
            reference = next((k for k in ("correct", "exact_match_flexible", *exact) if k in rows[0]), None)
            metrics |= judge_rows(cfg.judge, cfg.task.name, rows, reference)
            judged = {"judge_accuracy": "judge_correct", "judge_agreement": "judge_agrees"}
            intervals |= item_scores.intervals(rows, metrics, judged, {}, cfg.statistics)
        predictions.write(session.run_dir, rows)
        journal.remove(session.run_dir)
        (session.run_dir / "metrics.json").write_text(
            json.dumps({**metrics, "intervals": intervals}, indent=2) + "\n"
        )
        session.log_metrics({f"eval/{k}": v for k, v in {**metrics, **item_scores.flat(intervals)}.items()})
        session.log_table("predictions", rows)
        session.log_images({"confusion_matrix": session.run_dir / "confusion_matrix.png"})
        results = {
            "model": cfg.model.name,
            "task": cfg.task.name,
            "stage": STAGES[choice.layout],
            "ckpt": cfg.get("ckpt"),
            "overrides": overrides(),
            "grid_baseline": cfg.task.get("grid_baseline"),
            # the settings the outputs depend on, beside the scores they gave
            "prompt": OmegaConf.to_container(cfg.prompt, resolve=True),
            "generation": OmegaConf.to_container(cfg.generation, resolve=True),
            "optimized_metric": cfg.optimized_metric or headline_metric(metrics),
            "metrics": metrics,
            "intervals": intervals,
        }
        log.info("%s on %d examples", describe(metrics, intervals), len(rows))
        return session.finish(results)


def describe(metrics: dict[str, float], intervals: dict[str, dict[str, Any]]) -> str:
    """`metric value [low, high]` for every metric, with the interval where it has one."""
    parts = []
    for key, value in metrics.items():
        entry = intervals.get(key, {})
        bounds = f" [{entry['low']:.4f}, {entry['high']:.4f}]" if entry.get("low") is not None else ""
        parts.append(f"{key} {value:.4g}{bounds}")
    return ", ".join(parts)


def _nonempty(records: list[dict[str, Any]], cfg: DictConfig) -> list[dict[str, Any]]:
    """`records`, or a ValueError when there is nothing to evaluate (a metric over no examples means
    nothing)."""
    if not records:
        raise ValueError(
            f"task '{cfg.task.name}': the test split has no examples to evaluate (limit={cfg.get('limit')}); "
            "check task.data_files.test (or the task's source) and limit"
        )
    return records
