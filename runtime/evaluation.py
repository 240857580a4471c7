"""The evaluation run behind evaluate.py: generate answers for a task's test split and score them.

With `judge=openai_compatible`, an LLM judge also scores every prediction (runtime/judge.py):
`judge_accuracy` and its agreement with exact match are reported beside the automatic metrics.

Pass@1 is the mean exact match over problems (over samples too when `generation.num_samples` > 1);
pass@k uses the unbiased estimator of Chen et al. (2021): 1 - C(n-c, k) / C(n, k).
A `-m` grid of runs is joined by `EvaluationGrid` into `<stage>_performance.csv` (Pass@1 per model and
dataset, the drop from clean GSM8K to each noisy set) and a grouped bar chart.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import random
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf, open_dict
from peft import PeftModel
from transformers import AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

import datamodules
from lightning_modules import methods, models
from lightning_modules.classifier import HEAD_CONFIG, ClassificationMetrics, ClassifierModule, plot_confusion
from lightning_modules.generation import generate
from lightning_modules.label_lm import LabelLMModule
from runtime.judge import judge_rows
from runtime.results import RESULTS_FILE
from runtime.session import Session, overrides, start
from runtime.sweeps import MultirunSummary

log = logging.getLogger(__name__)

CLEAN_TASK = "gsm8k"


def checkpoint_dir(cfg: DictConfig) -> Path | None:
    """The directory `cfg.ckpt` names (a run dir's final/ when given a run dir), or None for the base model."""
    if not cfg.get("ckpt"):
        return None
    directory = Path(cfg.ckpt)
    return directory / "final" if (directory / "final").is_dir() else directory


def checkpoint_model(cfg: DictConfig) -> DictConfig:
    """The model config to evaluate: the one a `ckpt=` export was trained on when the command line chose no
    `model=` (its base_model.json), else `cfg.model`."""
    directory = checkpoint_dir(cfg)
    saved = _saved_identity(directory) if directory is not None else None
    chosen = any(o.lstrip("+~").startswith("model") for o in overrides())
    if saved is None or chosen or "config" not in saved:
        return cfg.model
    log.info("ckpt=%s was trained on model '%s': evaluating that model (pass model=... to choose another)", cfg.ckpt, saved["name"])
    return OmegaConf.create(saved["config"])


def load_model(cfg: DictConfig) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """The base model of `cfg.model`, or the fine-tuned one that `cfg.ckpt` points to (refused when it was
    trained on another base model, unless allow_base_mismatch)."""
    directory = checkpoint_dir(cfg)
    if directory is None:
        return models.build(cfg.model, cache_dir=cfg.paths.cache_dir)
    if (directory / "adapter_config.json").exists() or (directory / methods.METHOD_FILE).exists():
        base, tokenizer = models.build(cfg.model, cache_dir=cfg.paths.cache_dir)
        models.check_same_base(_saved_identity(directory), models.base_identity(base, cfg.model), f"ckpt={cfg.ckpt}",
                               bool(cfg.get("allow_base_mismatch")))
        if (directory / "tokenizer_config.json").exists():
            tokenizer = AutoTokenizer.from_pretrained(directory)
        if (directory / "adapter_config.json").exists():
            return _load_adapter(base, directory), tokenizer
        return methods.restore(base, directory, cfg.model), tokenizer
    if (directory / "config.json").exists():
        model_cfg = cfg.model.copy()
        with open_dict(model_cfg):
            model_cfg.path = str(directory)  # architecture comes from the saved config.json
        return models.build(model_cfg)
    raise FileNotFoundError(
        f"ckpt={cfg.ckpt}: expected a train.py run dir (with final/), a peft adapter dir (adapter_config.json), "
        f"a frozen-base method dir ({methods.METHOD_FILE}) or a save_pretrained dir (config.json)"
    )


def _saved_identity(directory: Path) -> dict[str, Any] | None:
    path = directory / methods.BASE_MODEL_FILE
    return json.loads(path.read_text()) if path.exists() else None


def _load_adapter(base: PreTrainedModel, directory: Path) -> PeftModel:
    """A peft adapter on `base`; a corrupt adapter file raises ValueError naming it."""
    try:
        return PeftModel.from_pretrained(base, directory)
    except Exception:
        weights = directory / "adapter_model.safetensors"
        if weights.exists():
            methods.read_safetensors(weights)  # raises the error that names a damaged file
        raise


def pass_at_k(samples: int, correct: int, k: int) -> float:
    """Unbiased pass@k for one problem with `correct` of `samples` completions right."""
    if samples - correct < k:
        return 1.0
    return 1.0 - math.comb(samples - correct, k) / math.comb(samples, k)


def run(cfg: DictConfig) -> dict[str, Any]:
    """Evaluate one (model, task, checkpoint); write predictions.jsonl, metrics.json and results.json."""
    with open_dict(cfg):
        cfg.model = checkpoint_model(cfg)
    with start(cfg, job_type="evaluate") as session:
        model, tokenizer = load_model(cfg)
        datamodule = datamodules.build(cfg, tokenizer)
        if cfg.task.get("evaluation") == "classify":
            rows, metrics = _classification_rows(cfg, model, datamodule, session.run_dir)
        else:
            rows, metrics = _generation_rows(cfg, model, tokenizer, datamodule)
        if cfg.get("judge") and rows:
            reference = next((k for k in ("correct", "exact_match_flexible") if k in rows[0]), None)
            metrics |= judge_rows(cfg.judge, cfg.task.name, rows, reference)
        with (session.run_dir / "predictions.jsonl").open("w", encoding="utf-8") as handle:
            handle.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
        (session.run_dir / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
        session.log_metrics({f"eval/{k}": v for k, v in metrics.items()})
        session.log_table("predictions", rows)
        session.log_images({"confusion_matrix": session.run_dir / "confusion_matrix.png"})
        results = {
            "model": cfg.model.name,
            "task": cfg.task.name,
            "stage": "sft" if cfg.get("ckpt") else "zero_shot",
            "ckpt": cfg.get("ckpt"),
            "overrides": overrides(),
            "optimized_metric": cfg.optimized_metric or primary_metric_name(metrics),
            "metrics": metrics,
        }
        log.info("%s on %d examples", {k: round(v, 4) for k, v in metrics.items()}, len(rows))
        return session.finish(results)


def _generation_rows(cfg: DictConfig, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase,
                     datamodule: Any) -> tuple[list[dict[str, Any]], dict[str, float]]:
    """Generate for every test example and score it: pass@ per `exact_match_*` score, means of the other scores."""
    records = _nonempty(datamodule.evaluation_records()[: cfg.get("limit")], cfg)
    shots = cfg.prompting.num_fewshot
    exemplars = random.Random(cfg.prompting.fewshot_seed).sample(datamodule.records("train"), shots) if shots else []
    prompts = [datamodule.generation_prompt(record, exemplars) for record in records]
    settings = OmegaConf.to_container(cfg.generation, resolve=True)
    settings["stop_strings"] = [*settings["stop_strings"], *datamodule.extra_stop_strings]
    completions = generate(model, tokenizer, prompts, **settings)

    rows, samples = [], cfg.generation.num_samples
    for index, (record, prompt, generations) in enumerate(zip(records, prompts, completions, strict=True)):
        reference = datamodule.reference(record)
        scores = [datamodule.score(text, reference) for text in generations]
        row = {"index": index, "where": record.get("_where"), "prompt": prompt, "generation": generations[0], "gold": reference}
        row |= scores[0]
        for mode in [key.removeprefix("exact_match_") for key in scores[0] if key.startswith("exact_match_")]:
            right = int(sum(s[f"exact_match_{mode}"] for s in scores))
            row[f"pass@1_{mode}"] = right / samples
            if samples > 1:
                row[f"pass@{samples}_{mode}"] = pass_at_k(samples, right, samples)
        if samples > 1:
            row["generations"] = generations
        rows.append(row)

    # every float score (None where it does not apply to a row) is averaged over the rows that have it
    metric_keys = dict.fromkeys(k for row in rows for k, v in row.items() if isinstance(v, float) and not k.startswith("exact_match_"))
    metrics = {}
    for key in metric_keys:
        values = [row[key] for row in rows if row.get(key) is not None]
        metrics[key] = sum(values) / len(values)
    metrics |= datamodule.corpus_metrics([row["generation"] for row in rows], [row["gold"] for row in rows])
    metrics["num_problems"] = len(rows)
    return rows, metrics


def _classification_rows(cfg: DictConfig, model: PreTrainedModel, datamodule: Any,
                         run_dir: Path) -> tuple[list[dict[str, Any]], dict[str, float]]:
    """Classify every test example (label likelihood, or the saved projection head); accuracy and macro F1."""
    directory = checkpoint_dir(cfg)
    if directory is not None and (directory / HEAD_CONFIG).exists():
        module = ClassifierModule.load(model, directory)
    else:
        module = LabelLMModule(model, datamodule.label_token_ids(), datamodule.class_names, datamodule.tokenizer.pad_token_id)
    module.eval()
    records = _nonempty(datamodule.records("test")[: cfg.get("limit")], cfg)
    examples = datamodule.tokenize_all(records, "test")
    metrics, rows, size = ClassificationMetrics(len(datamodule.class_names)), [], cfg.generation.batch_size
    with torch.no_grad():
        for first in range(0, len(examples), size):
            batch = datamodule.collate(examples[first : first + size])
            scores = module.predict_classes({k: v.to(module.device) for k, v in batch.items()}).cpu()  # [B, C]
            predicted = scores.argmax(-1)
            metrics.update(predicted, batch["class_index"])
            for offset, (record, guess, truth) in enumerate(zip(records[first : first + size], predicted.tolist(),
                                                                batch["class_index"].tolist(), strict=True)):
                rows.append({"index": first + offset, "where": record.get("_where"),
                             "text": record[datamodule.text_column], "gold": datamodule.class_names[truth],
                             "predicted": datamodule.class_names[guess], "correct": float(guess == truth),
                             "scores": dict(zip(datamodule.class_names, scores[offset].tolist(), strict=True))})
    values, matrix = metrics.compute()
    plot_confusion(matrix, datamodule.class_names, run_dir / "confusion_matrix.png", f"{cfg.model.name} on {cfg.task.name}")
    return rows, {**values, "num_examples": len(rows)}


def _nonempty(records: list[dict[str, Any]], cfg: DictConfig) -> list[dict[str, Any]]:
    """`records`, or a ValueError when there is nothing to evaluate (a metric over no examples means nothing)."""
    if not records:
        raise ValueError(
            f"task '{cfg.task.name}': the test split has no examples to evaluate (limit={cfg.get('limit')}); "
            "check task.data_files.test (or the task's source) and limit"
        )
    return records


def primary_metric_name(metrics: dict[str, float]) -> str:
    """The headline metric of an evaluation: flexible Pass@1 (GSM8K), accuracy (classification) or corpus BLEU."""
    return next((key for key in ("pass@1_flexible", "accuracy", "corpus_bleu") if key in metrics), next(iter(metrics)))


def performance_table(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Rows (model, dataset, Pass@1, drop from the clean set) for the runs of one stage."""
    clean = {r["model"]: r["metrics"] for r in results if r["task"] == CLEAN_TASK}
    rows = []
    for result in sorted(results, key=lambda r: (r["model"], r["task"] != CLEAN_TASK, r["task"])):
        row = {"model": result["model"], "dataset": result["task"], "num_problems": result["metrics"]["num_problems"]}
        for mode in ("strict", "flexible"):
            score = result["metrics"][f"pass@1_{mode}"]
            row[f"pass@1_{mode}"] = score
            base = clean.get(result["model"], {}).get(f"pass@1_{mode}")
            drop = None if base is None or result["task"] == CLEAN_TASK else base - score
            row[f"drop_abs_{mode}"] = drop
            row[f"drop_rel_{mode}"] = None if drop is None or base == 0 else drop / base
        rows.append(row)
    return rows


def write_grid(results: list[dict[str, Any]], out_dir: Path) -> list[Path]:
    """`<stage>_performance.csv` and `.png` in `out_dir` for every stage (zero_shot, sft) among `results`."""
    results = [r for r in results if "pass@1_flexible" in r["metrics"]]  # GSM8K-style runs
    written = []
    for stage in sorted({r["stage"] for r in results}):
        rows = performance_table([r for r in results if r["stage"] == stage])
        path = Path(out_dir) / f"{stage}_performance.csv"
        with path.open("w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
        written += [path, _bar_chart(rows, path.with_suffix(".png"), stage)]
    return written


def _bar_chart(rows: list[dict[str, Any]], path: Path, stage: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    datasets = list(dict.fromkeys(r["dataset"] for r in rows))
    model_names = list(dict.fromkeys(r["model"] for r in rows))
    width = 0.8 / len(model_names)
    figure, axis = plt.subplots(figsize=(1.6 + 1.4 * len(datasets), 3.6))
    for i, model_name in enumerate(model_names):
        scores = {r["dataset"]: r["pass@1_flexible"] for r in rows if r["model"] == model_name}
        axis.bar([d + i * width for d in range(len(datasets))], [scores.get(d, 0.0) for d in datasets], width, label=model_name)
    axis.set_xticks([d + width * (len(model_names) - 1) / 2 for d in range(len(datasets))], datasets)
    axis.set_ylim(0, max(0.05, 1.15 * max(r["pass@1_flexible"] for r in rows)))
    axis.set_ylabel("Pass@1 (flexible)")
    axis.set_title(f"GSM8K noise robustness ({stage.replace('_', '-')})")
    axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path


class EvaluationGrid(MultirunSummary):
    """Hydra callback: after an evaluate.py `-m` grid, the sweep summary plus the Pass@1 tables and charts
    (one W&B table per stage in the sweep's summary run)."""

    def report(self, sweep_dir: Path, session: Session) -> None:
        results = [json.loads(p.read_text()) for p in sorted(sweep_dir.glob(f"*/{RESULTS_FILE}"))]
        for path in write_grid(results, sweep_dir):
            log.info("Evaluation grid: %s", path)
            if path.suffix == ".csv":
                with path.open() as handle:
                    session.log_table(path.stem, list(csv.DictReader(handle)))
            else:
                session.log_images({path.stem: path})
