"""The GSM8K noise-robustness study as one command: zero-shot -> SFT -> re-evaluation -> attention -> report.

    python -m analysis.noise_study                              # DiffLlama-375M vs Llama-375M
    python -m analysis.noise_study study=diffllama_noise_quick  # tiny models, CPU, a few minutes
    python -m analysis.noise_study study.sft=false study.attention=false   # zero-shot Pass@1 only

Every step is an ordinary train.py / evaluate.py / analysis.attention job composed from the same config
groups, with its own run dir under the study dir. The study dir gets `zero_shot_performance.csv`,
`sft_performance.csv` and their charts, `study_summary.csv` (Pass@1 per model and dataset before and
after SFT), `attention_allocation.csv` + `attention_allocation.png` (KMI / NI / OC shares of every model,
base and fine-tuned, on every noisy set) and `study_report.md`, which states per stage and noise type
whether the first model (differential attention) was more robust than the second: the drop from clean
to noisy Pass@1 of each, the difference of the drops with a bootstrap confidence interval over problems
(the clean and noisy versions of a problem are resampled together) and the number of problems.
"""

from __future__ import annotations

import csv
import json
import logging
from pathlib import Path
from typing import Any

import hydra
import numpy as np
from hydra import compose
from omegaconf import DictConfig, open_dict

from analysis import attention, plots
from runtime import evaluation, task_grid, training
from runtime.session import overrides, start

log = logging.getLogger(__name__)


def _job(config_name: str, overrides: list[str], run_dir: Path) -> DictConfig:
    cfg = compose(config_name=config_name, overrides=overrides)
    with open_dict(cfg):
        cfg.paths.output_dir = str(run_dir)
    return cfg


def _stage(study: DictConfig, study_dir: Path, stage: str, model: str, ckpt: list[str]) -> tuple[list, list]:
    """Evaluate `model` (base or `ckpt`) on every task, then analyse its attention on the noisy ones."""
    common = list(study.common)
    results = [
        evaluation.run(
            _job(
                "evaluate",
                [*common, *study.evaluate, f"model={model}", f"task={task}", *ckpt],
                study_dir / stage / model / task,
            )
        )
        for task in study.tasks
    ]
    allocations = []
    if study.attention:
        for task in [t for t in study.tasks if t != study.baseline_task]:
            cfg = _job(
                "attention",
                [*common, *study.attention_overrides, f"model={model}", f"task={task}", *ckpt],
                study_dir / stage / model / f"attention_{task}",
            )
            allocations.append({"stage": stage, **attention.analyse(cfg)})
    return results, allocations


def run_study(study: DictConfig, study_dir: Path) -> list[dict[str, Any]]:
    """Run every stage of `study` under `study_dir`; write the tables, figures and report; return the summary
    rows."""
    results: list[dict[str, Any]] = []
    allocations: list[dict[str, Any]] = []
    for model in study.models:
        stages = [("zero_shot", [])]
        if study.sft:
            trained = training.run(
                _job(
                    "train",
                    [*study.common, *study.train, f"model={model}", "task=gsm8k"],
                    study_dir / "sft" / model / "train",
                )
            )
            stages.append(("sft", [f"ckpt={trained['final_dir']}"]))
        for stage, ckpt in stages:
            stage_results, stage_allocations = _stage(study, study_dir, stage, model, ckpt)
            results += stage_results
            allocations += stage_allocations
    rows = write_tables(results, study_dir, study.baseline_task)
    if allocations:
        write_allocations(allocations, study_dir)
    comparisons = robustness(results, list(study.models), study.report, study.baseline_task)
    (study_dir / "study_report.md").write_text(report(study, rows, comparisons, allocations))
    return rows


def write_tables(results: list[dict[str, Any]], study_dir: Path, baseline: str) -> list[dict[str, Any]]:
    """Per-stage performance tables and charts (drops from `baseline`), and the before/after
    `study_summary.csv`."""
    task_grid.write_grid(results, study_dir, baseline)
    rows = [{"stage": r["stage"], "model": r["model"], "dataset": r["task"], **r["metrics"]} for r in results]
    with (study_dir / "study_summary.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return rows


def correct_by_problem(result: dict[str, Any], mode: str) -> np.ndarray:
    """Per-problem Pass@1 (`mode`: strict or flexible) of one evaluation run, in problem order."""
    lines = (Path(result["run_dir"]) / "predictions.jsonl").read_text().splitlines()
    return np.array([json.loads(line)[f"pass@1_{mode}"] for line in lines])


def robustness(
    results: list[dict[str, Any]], models: list[str], settings: DictConfig, baseline: str
) -> list[dict[str, Any]]:
    """Per stage and noise type: each model's drop from the clean `baseline` task to the noisy one, and the
    first model's advantage with a CI.

    advantage = drop(second model) - drop(first model): positive when the first model loses less to the
    noise. The CI resamples problems with replacement, keeping each problem's clean and noisy versions
    and both models together (percentile bootstrap, `settings.bootstrap_samples` resamples).
    """
    if len(models) < 2:
        return []
    first, second = models[:2]
    by_key = {(r["stage"], r["model"], r["task"]): r for r in results}
    rng = np.random.default_rng(settings.seed)
    rows = []
    for stage in dict.fromkeys(r["stage"] for r in results):
        for task in dict.fromkeys(r["task"] for r in results if r["task"] != baseline):
            keys = [(stage, m, t) for m in (first, second) for t in (baseline, task)]
            if not all(k in by_key for k in keys):
                continue
            clean_a, noisy_a, clean_b, noisy_b = (correct_by_problem(by_key[k], settings.mode) for k in keys)
            n = min(map(len, (clean_a, noisy_a, clean_b, noisy_b)))
            drop_a, drop_b = clean_a[:n] - noisy_a[:n], clean_b[:n] - noisy_b[:n]  # [n] per-problem drops
            samples = rng.integers(0, n, size=(settings.bootstrap_samples, n))
            advantages = (drop_b[samples] - drop_a[samples]).mean(1)
            tail = (1 - settings.confidence) / 2
            low, high = np.quantile(advantages, [tail, 1 - tail])
            advantage = float(drop_b.mean() - drop_a.mean())
            verdict = "more robust" if low > 0 else "less robust" if high < 0 else "no clear difference"
            rows.append(
                {
                    "stage": stage,
                    "noise": task,
                    "problems": n,
                    f"drop_{first}": float(drop_a.mean()),
                    f"drop_{second}": float(drop_b.mean()),
                    "advantage": advantage,
                    "ci_low": float(low),
                    "ci_high": float(high),
                    "verdict": f"{first} {verdict}",
                }
            )
    return rows


def write_allocations(allocations: list[dict[str, Any]], study_dir: Path) -> Path:
    """`attention_allocation.csv` (mean KMI / NI / OC ratio per model, stage, noisy set) and its bar chart."""
    rows = []
    for result in allocations:
        name, entry = next(iter(result["maps"].items()))
        rows.append(
            {
                "stage": result["stage"],
                "model": result["model"],
                "dataset": result["task"],
                "map": name,
                "problems": result["num_problems"],
                **{f"{c}_ratio": entry["ratio"][c]["mean"] for c in attention.CLASSES},
                "kmi_to_ni_score": entry["table3"]["kmi_to_ni"],
            }
        )
    with (study_dir / "attention_allocation.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    labelled = [{**r, "model": f"{r['model']} ({r['stage']})"} for r in allocations]
    return plots.allocation_comparison(labelled, study_dir / "attention_allocation.png")


def report(
    study: DictConfig,
    rows: list[dict[str, Any]],
    comparisons: list[dict[str, Any]],
    allocations: list[dict[str, Any]],
) -> str:
    """The study's markdown report: Pass@1 tables, robustness verdicts with CIs, attention allocation."""
    mode = study.report.mode
    lines = [
        f"# Noise-robustness study `{study.name}`",
        "",
        f"Models: {', '.join(study.models)}; sets: {', '.join(study.tasks)}; SFT: {bool(study.sft)}; "
        f"attention analysis: {bool(study.attention)}. Pass@1 ({mode} extraction).",
        "",
    ]
    for stage in dict.fromkeys(r["stage"] for r in rows):
        lines += [
            f"## Pass@1 ({stage.replace('_', '-')})",
            "",
            "| model | " + " | ".join(study.tasks) + " |",
            "|---|" + "---|" * len(study.tasks),
        ]
        for model in study.models:
            scores = {
                r["dataset"]: r.get(f"pass@1_{mode}")
                for r in rows
                if r["stage"] == stage and r["model"] == model
            }
            lines.append(
                f"| {model} | "
                + " | ".join(f"{scores[t]:.3f}" if scores.get(t) is not None else "-" for t in study.tasks)
                + " |"
            )
        lines += ["", f"![{stage}]({stage}_performance.png)", ""]
    if comparisons:
        first, second = list(study.models)[:2]
        confidence = f"{study.report.confidence:.0%}"
        lines += [
            "## Is differential attention more robust?",
            "",
            f"Advantage = drop of {second} - drop of {first} (clean -> noisy Pass@1); > 0: {first} loses "
            f"less. {confidence} bootstrap CI over problems.",
            "",
            f"| stage | noise | problems | drop {first} | drop {second} | advantage [{confidence} CI] | "
            "verdict |",
            "|---|---|---|---|---|---|---|",
        ]
        for c in comparisons:
            lines.append(
                f"| {c['stage']} | {c['noise']} | {c['problems']} | {c[f'drop_{first}']:.3f} | "
                f"{c[f'drop_{second}']:.3f} | "
                f"{c['advantage']:+.3f} [{c['ci_low']:+.3f}, {c['ci_high']:+.3f}] | {c['verdict']} |"
            )
        lines.append("")
    if allocations:
        lines += [
            "## Attention allocation on the noisy sets",
            "",
            "| stage | model | set | problems | KMI | NI | OC | KMI/NI score |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for result in allocations:
            entry = next(iter(result["maps"].values()))
            ratio = {c: entry["ratio"][c]["mean"] for c in attention.CLASSES}
            kmi_to_ni = entry["table3"]["kmi_to_ni"]
            lines.append(
                f"| {result['stage']} | {result['model']} | {result['task']} | {result['num_problems']} | "
                + " | ".join("-" if ratio[c] is None else f"{ratio[c]:.3f}" for c in attention.CLASSES)
                + f" | {'-' if kmi_to_ni is None else f'{kmi_to_ni:.3f}'} |"
            )
        lines += ["", "![allocation](attention_allocation.png)", ""]
    return "\n".join(lines)


@hydra.main(version_base="1.3", config_path="../conf", config_name="noise_study")
def main(cfg: DictConfig) -> None:
    """Hydra entrypoint of the study driver."""
    with start(cfg, job_type="analysis") as session:
        rows = run_study(cfg.study, session.run_dir)
        mode = cfg.study.report.mode
        headline = {
            f"{r['stage']}/{r['model']}/{r['dataset']}/pass@1_{mode}": r[f"pass@1_{mode}"]
            for r in rows
            if f"pass@1_{mode}" in r
        }
        session.log_metrics(headline)
        session.log_table("study_summary", rows)
        session.log_images({path.stem: path for path in sorted(session.run_dir.glob("*.png"))})
        session.finish({"study": cfg.study.name, "overrides": overrides(), "metrics": headline})


if __name__ == "__main__":
    main()
