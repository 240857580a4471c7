"""Generation scoring for evaluate.py: generate for every test example of a task and score each completion.

Pass@1 is the mean exact match over problems (over samples too when `generation.num_samples` > 1); with
n samples, pass@k for every k of `generation.k` uses the unbiased estimator of Chen et al. (2021),
1 - C(n-c, k) / C(n, k), and maj@k the majority answer of the first k samples (stats/sampled.py); a pass@k
curve is drawn in the run dir (pass_at_k.png). Every other float score
of a row (BLEU, judge agreement, ...) is averaged over the rows that have it. Every mean comes with its
interval from the per-item scores, and every corpus metric (corpus BLEU) with a bootstrap interval over
items (stats/item_scores.py).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from datamodules.task import Task
from evaluation import vllm_backend
from evaluation.loaded import Loaded
from evaluation.scorers import Scored
from figures.runs import pass_at_k_curves
from modeling.generation import generate
from stats import item_scores, sampled


def prompts(cfg: DictConfig, task: Task, records: list[dict[str, Any]]) -> list[str]:
    """The prompt of every record, its exemplars drawn (seeded) over all records."""
    style = task.prompt_format
    exemplars = style.fewshot_exemplars(records, cfg.prompt.num_fewshot, cfg.prompt.fewshot_seed)
    return [style.prompt(record, shots) for record, shots in zip(records, exemplars, strict=True)]


def batch_size(cfg: DictConfig) -> int:
    """Prompts decoded together: `generation.batch_size`."""
    return cfg.generation.batch_size


def outputs(
    cfg: DictConfig,
    loaded: Loaded,
    task: Task,
    records: list[dict[str, Any]],
    share: list[int],
    on_finished: Callable[[int, Any], None],
) -> list[list[str]]:
    """The `generation.num_samples` completions of each record of `share` (indices into `records`), from
    lmlab's generation or (`generation.backend=vllm`) a vLLM engine, each record's handed to `on_finished`
    once they are all done."""
    everything = prompts(cfg, task, records)
    chosen = [everything[i] for i in share]
    if vllm_backend.backend(cfg) == "vllm":
        texts = vllm_backend.generate(cfg, loaded.choice, loaded.tokenizer, chosen, settings(cfg, task))
        for index, completions in zip(share, texts, strict=True):
            on_finished(index, completions)
        return texts

    def finished(position: int, completions: list[str]) -> None:
        on_finished(share[position], completions)

    return generate(loaded.model, loaded.tokenizer, chosen, **settings(cfg, task), on_finished=finished)


def settings(cfg: DictConfig, task: Task) -> dict[str, Any]:
    """lmlab's generation keywords from `cfg.generation`, the task's stop strings added."""
    chosen = OmegaConf.to_container(cfg.generation, resolve=True)
    for engine_key in ("backend", "vllm", "k"):
        chosen.pop(engine_key, None)
    chosen["stop_strings"] = task.prompt_format.stop_strings(chosen["stop_strings"])
    return chosen


def score(
    cfg: DictConfig,
    task: Task,
    records: list[dict[str, Any]],
    completions: list[list[str]],
    run_dir: Path,
) -> Scored:
    """Score every completion: pass@ per `exact_match_*` score, means of the other scores, corpus metrics;
    and the interval of each."""
    style = task.prompt_format
    texts = prompts(cfg, task, records)

    rows, samples = [], cfg.generation.num_samples
    chosen_ks = sampled.ks(samples, cfg.generation.get("k"))
    for index, (record, prompt, generations) in enumerate(zip(records, texts, completions, strict=True)):
        reference = style.reference(record)
        scores = [style.score(text, reference) for text in generations]
        row = {
            "index": index,
            "where": record.get("_where"),
            "prompt": prompt,
            "generation": generations[0],
            "gold": reference,
        }
        row |= scores[0]
        for mode in [key.removeprefix("exact_match_") for key in scores[0] if key.startswith("exact_match_")]:
            right = [s[f"exact_match_{mode}"] for s in scores]
            for k in chosen_ks:
                row[f"pass@{k}_{mode}"] = sampled.pass_at_k(samples, int(sum(right)), k)
            answers = [s.get(f"extracted_{mode}") for s in scores]
            for k in [k for k in chosen_ks if k > 1 and f"extracted_{mode}" in scores[0]]:
                row[f"maj@{k}_{mode}"] = sampled.majority_at_k(answers, right, k)
        if samples > 1:
            row["generations"] = generations
        rows.append(row)

    # every float score (None where it does not apply to a row) is averaged over the rows that have it
    metric_keys = dict.fromkeys(
        k for row in rows for k, v in row.items() if isinstance(v, float) and not k.startswith("exact_match_")
    )
    metrics = {}
    for key in metric_keys:
        values = [row[key] for row in rows if row.get(key) is not None]
        metrics[key] = sum(values) / len(values)
    generations, golds = [row["generation"] for row in rows], [row["gold"] for row in rows]
    metrics |= task.corpus_metrics(generations, golds)
    item_scores.assign_ids(rows)
    intervals = item_scores.intervals(
        rows,
        metrics,
        {key: key for key in metric_keys},
        task.corpus_statistics(generations, golds),
        cfg.statistics,
    )
    metrics["num_problems"] = len(rows)
    if samples > 1:
        pass_at_k_curves({cfg.model.name: (metrics, intervals)}, run_dir / "pass_at_k.png", cfg.task.name)
    return rows, metrics, intervals
