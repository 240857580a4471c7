"""lm-evaluation-harness's benchmarks on lmlab's model (`task=lm_eval`): lm-eval (its Python API) runs each
benchmark on the model and tokenizer lmlab loaded (`HFLM(pretrained=<model>)`), with lmlab's prompt settings
(the chat template, `prompt.system`, `prompt.fewshot_as_multiturn`), seed and `limit` (examples per
benchmark).

Its per-sample logs become lmlab's rows, one per (benchmark, document), named `<benchmark>[<doc_id>]`, so runs
pair item by item in analysis.compare. A metric is reported as lm-eval reports it (`<benchmark>/<metric>,
<filter>`, e.g. `arc_easy/acc,none`); where lm-eval's value is the mean of its per-sample values, the interval
comes from those (conf/statistics), else it has none (perplexities, corpus scores)."""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from datamodules.task import Task
from evaluation.loaded import Loaded
from evaluation.scorers import Scored
from stats import item_scores


def batch_size(cfg: DictConfig) -> int:
    """Benchmarks per call of `outputs` (each is batched by lm-eval at `data.eval_batch_size`)."""
    return 1


def outputs(
    cfg: DictConfig,
    loaded: Loaded,
    task: Task,
    records: list[dict[str, Any]],
    share: list[int],
    on_finished: Callable[[int, Any], None],
) -> list[dict[str, Any]]:
    """Each benchmark of `share`: lm-eval's results and its per-sample metric values."""
    import lm_eval
    from lm_eval.models.huggingface import HFLM

    size = cfg.data.get("eval_batch_size") or cfg.data.batch_size
    model = HFLM(pretrained=loaded.model, tokenizer=loaded.tokenizer, batch_size=size)
    manager = _task_manager(task.include_path, [records[i]["benchmark"] for i in share])
    chat = task.chat_style
    done = []
    for index in share:
        evaluated = lm_eval.simple_evaluate(
            model=model,
            tasks=[records[index]["benchmark"]],
            task_manager=manager,
            num_fewshot=task.num_fewshot,
            limit=cfg.get("limit"),
            log_samples=True,
            apply_chat_template=chat is not None,
            fewshot_as_multiturn=bool(chat and chat.fewshot_as_multiturn),
            system_instruction=chat.system if chat else None,
            bootstrap_iters=0,  # lmlab's intervals come from the per-sample values
            random_seed=cfg.seed,
            numpy_random_seed=cfg.seed,
            torch_random_seed=cfg.seed,
            fewshot_random_seed=cfg.prompt.fewshot_seed,
        )
        output = {
            "results": {
                name: {k: v for k, v in values.items() if _number(v)}
                for name, values in evaluated["results"].items()
            },
            "samples": {
                name: [_sample(s) for s in samples] for name, samples in evaluated["samples"].items()
            },
        }
        on_finished(index, output)
        done.append(output)
    return done


def _task_manager(include_path: str | None, names: list[str]) -> Any:
    """lm-eval's task index: of `include_path` alone where it defines every task named (indexing lm-eval's
    own thousands of task files takes seconds), else of lm-eval's tasks and `include_path`."""
    from lm_eval.tasks import TaskManager

    if include_path:
        local = TaskManager(include_path=include_path, include_defaults=False)
        if set(names) <= set(local.all_tasks):
            return local
    return TaskManager(include_path=include_path)


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _sample(sample: dict[str, Any]) -> dict[str, Any]:
    """A per-sample log cut to what scoring needs: the document, its target, filter and metric values."""
    values = {metric: sample[metric] for metric in sample["metrics"] if metric in sample}
    return {
        "doc_id": sample["doc_id"],
        "target": str(sample["target"]),
        "filter": sample["filter"],
        "values": {k: float(v) if isinstance(v, (bool, int, float)) else None for k, v in values.items()},
    }


def score(
    cfg: DictConfig,
    task: Task,
    records: list[dict[str, Any]],
    outputs: list[dict[str, Any]],
    run_dir: Path,
) -> Scored:
    """Rows per (benchmark, document) with its metric values; lm-eval's metrics, each with the interval of
    its per-sample values where their mean is lm-eval's value."""
    rows: dict[tuple[str, int], dict[str, Any]] = {}
    metrics: dict[str, float] = {}
    for output in outputs:
        for name, samples in output["samples"].items():
            for sample in samples:
                row = rows.setdefault(
                    (name, sample["doc_id"]),
                    {"index": len(rows), "where": f"{name}[{sample['doc_id']}]", "benchmark": name},
                )
                row["target"] = sample["target"]
                for metric, value in sample["values"].items():
                    row[f"{name}/{metric},{sample['filter']}"] = value
        for name, values in output["results"].items():
            for key, value in values.items():
                if "_stderr" not in key and key != "alias":
                    metrics[f"{name}/{key}"] = float(value)
    rows_list = list(rows.values())
    item_scores.assign_ids(rows_list)
    per_item = {}
    for key, value in metrics.items():
        values = [row[key] for row in rows_list if row.get(key) is not None]
        if values and math.isclose(sum(values) / len(values), value, rel_tol=1e-9, abs_tol=1e-12):
            per_item[key] = key
    intervals = item_scores.intervals(rows_list, metrics, per_item, {}, cfg.statistics)
    metrics["num_examples"] = len(rows_list)
    return rows_list, metrics, intervals
